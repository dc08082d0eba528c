"""The seed post's measurement on several models (collapse_lab/evaluation/observe.py): `python eval/observe.py models=[...]`,
the same as `collapse-lab observe models=[...]`."""

import sys

from collapse_lab.cli import main

if __name__ == "__main__":
    main(["observe", *sys.argv[1:]])
