"""The call per base, and whether the bases agree (numpy/json only, no torch): the powered design's replication.

    python -m collapse_lab.lab.replication <ablation dir> [<ablation dir> ...] [--null <ablation dir>] [--out FILE]

Each directory is one finished ablation (its report.json; one base each: `pretrain.seed` differs). For each the
primary pair's matched-KL comparison (report.json frontier.primary, else the first KL comparison of online RL
against FeedME): D, its interval, its half-width against the margin, the call, and the closed forms' predicted
call. The bases AGREE when every call is the same and none is "undecided". With --null: the null world's
collapsed regimes, which must be none. Writes the table to stdout (and --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def primary_comparison(report: dict) -> Optional[dict]:
    """The report's primary KL comparison (frontier.primary), else its first online-RL one at matched KL."""
    fr = report.get("frontier") or {}
    comps = [c for c in fr.get("comparisons", []) if c.get("x") == "kl"]
    primary = fr.get("primary")
    if primary:
        comps = [c for c in comps if f"{c['regime']}:{c['feedme']}" == primary]
    else:
        comps = [c for c in comps if c.get("group") == "online RL"] or comps
    return comps[0] if comps else None


def base_row(report: dict) -> dict:
    """One base's line: which base, the primary pair, D and interval, half-width vs margin, call, predicted call."""
    c = primary_comparison(report)
    lab = (report.get("config") or {}).get("lab") or []
    seed = next((o.split("=", 1)[1] for o in lab if o.startswith("pretrain.seed=")), "0")
    if c is None:
        return {"base": f"pretrain.seed={seed}", "pair": None, "call": "no comparison"}
    d = c["difference"]
    half = None if d.get("lo") is None else (d["hi"] - d["lo"]) / 2
    pred = next((p for p in (report.get("closed_forms") or {}).get("predictions", [])
                 if p["regime"] == c["regime"] and p["feedme"] == c["feedme"] and p["x"] == "kl"), {})
    return {"base": f"pretrain.seed={seed}", "pair": f"{c['regime']} vs {c['feedme']}", "mean": d.get("mean"),
            "lo": d.get("lo"), "hi": d.get("hi"), "half_width": half, "margin": report["frontier"]["margin"],
            "range": [c.get("x_min"), c.get("x_max")], "seeds": len(c.get("seeds", [])),
            "prompts": len((c.get("crossed") or {}).get("prompts", [])) or None, "call": c["call"],
            "predicted_call": pred.get("predicted_call"), "artefact": pred.get("artefact_difference"),
            "artefact_per_prompt": (pred.get("artefact_crossed") or {}).get("mean")}


def agreement(rows: list[dict]) -> str:
    calls = {r["call"] for r in rows}
    if len(rows) < 2:
        return "one base: no replication"
    if len(calls) == 1 and not calls & {"undecided", "one seed: no call", "no comparison", "no common range"}:
        return f"AGREE: every base calls '{calls.pop()}'"
    return "DISAGREE or undecided: " + "; ".join(f"{r['base']}: {r['call']}" for r in rows)


def markdown(rows: list[dict], null: Optional[dict] = None) -> str:
    f = lambda x, s="+.4f": "-" if x is None else format(x, s)  # noqa: E731
    md = ["| base | primary pair | KL range | seeds | prompts | D [95% interval] | half-width (margin) | call | "
          "predicted | artefact D | per prompt |", "|" + "---|" * 11]
    for r in rows:
        rng = r.get("range") or [None, None]
        md.append(f"| {r['base']} | {r.get('pair')} | [{f(rng[0], '.3f')}, {f(rng[1], '.3f')}] | {r.get('seeds', '-')} | "
                  f"{r.get('prompts') or '-'} | {f(r.get('mean'))} [{f(r.get('lo'))}, {f(r.get('hi'))}] | "
                  f"{f(r.get('half_width'), '.4f')} ({f(r.get('margin'), 'g')}) | {r['call']} | "
                  f"{r.get('predicted_call') or '-'} | {f(r.get('artefact'), '+.5f')} | "
                  f"{f(r.get('artefact_per_prompt'), '+.5f')} |")
    md += ["", agreement(rows)]
    if null is not None:
        collapsed = (null.get("verdict") or {}).get("collapsed", [])
        md += ["", f"Null world ({null.get('ablation')}): collapsed regimes: {', '.join(collapsed) or 'none'} "
               f"({'as it should be' if not collapsed else 'SHOULD BE NONE: an artefact, not a preference'})."]
    return "\n".join(md) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collapse_lab.lab.replication", description=__doc__.splitlines()[0])
    ap.add_argument("ablations", nargs="+", type=Path)
    ap.add_argument("--null", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    reports = []
    for d in args.ablations + ([args.null] if args.null else []):
        path = d / "report.json"
        if not path.is_file():
            print(f"error: {path} not found (run `collapse-lab report {d}` or the ablation first)", file=sys.stderr)
            return 2
        reports.append(json.loads(path.read_text()))
    null = reports.pop() if args.null else None
    text = markdown([base_row(r) for r in reports], null)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
