"""Stage 1: pretrain the lab's tiny base on the world's corpus.

    1. corpus     world.documents(...), deterministic in (world, pretrain.seed)
    2. tokenizer  byte-level BPE trained on a separate slice of the corpus
    3. model      a from-scratch causal LM sized by the model preset
    4. train      next-token cross-entropy on whole documents + EOS (pads masked out),
                  with transformers' Trainer: AdamW, cosine schedule, resumable saves,
                  DDP/FSDP/DeepSpeed when started by `accelerate launch`, W&B logging
    5. save       checkpoints/base/<name>/: safetensors, tokenizer, config.yaml,
                  manifest.json (status, steps, tokens seen, wall time, commit, versions)

A finished run is not redone; an interrupted one resumes from its last save.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
from datasets import Dataset
from torch.utils.data import Sampler
from omegaconf import DictConfig
from transformers import (AutoTokenizer, DataCollatorForLanguageModeling, PreTrainedTokenizerFast, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)

from collapse_lab.core.checkpoint import publish, read_manifest, write_manifest, fault
from collapse_lab.core.console import note
from collapse_lab.core.config import CORPUS_KEYS, ConfigError, read_record, run_dir
from collapse_lab.core.distributed import exact_div, process_state, world_size
from collapse_lab.models.models import build_base_model, check_base
from collapse_lab.models.real_models import resolve as resolve_real
from collapse_lab.stages.stage import Run, hf_args, stage_function
from collapse_lab.models.tokenizer import train_tokenizer
from collapse_lab.world.world import World, heldout_digest, make_world
from collapse_lab.core import tracking

STAGE = "base"
STAGE_KEYS = ("model", "pretrain") + CORPUS_KEYS  # what a base depends on: its directory's hash


def base_dir(cfg: DictConfig, named: bool = True) -> Path:
    """checkpoints/base/<model>-s<seed>[-h<held-out digest>]-<hash>: with world.heldout_templates, the held-out prompts'
    texts (code, not config: world.HELDOUT_TEMPLATES) name the base too, so a changed set never reuses a base
    pretrained on another, nor do the runs downstream of it (their keys hold the base's path)."""
    held = f"-h{heldout_digest()}" if getattr(cfg.world, "heldout_templates", False) else ""
    return run_dir(cfg, STAGE, STAGE_KEYS, f"{cfg.model.name}-s{cfg.pretrain.seed}{held}", named)


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerFast, max_len: int) -> Dataset:
    """Each document becomes prompt+completion tokens + EOS, cut at max_len."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return Dataset.from_dict({"input_ids": [(x + [tokenizer.eos_token_id])[:max_len] for x in ids]})


def resolve_base(cfg: DictConfig) -> str:
    """The base every regime starts from and is compared with: `base_path=`, else the model
    preset's `path` (a real model), else the lab's own base, pretrained first if missing. A given
    path is checked first (collapse_lab/models/models.py: check_base)."""
    path = cfg.base_path or cfg.model.path
    if path is None:
        return str(pretrain(cfg, named=False))
    path = resolve_real(path, Path(cfg.checkpoints_dir) / "real")  # real:<name> / .gguf: its dequantised directory
    # a user's model: checked before the stage writes anything (one line naming what it lacks)
    check_base(path, make_world(cfg.world), max(cfg.ratings.max_new_tokens, cfg.ppo.max_new_tokens))
    return path


def check(cfg: DictConfig) -> None:
    if cfg.model.path is not None:
        raise ConfigError(f"model '{cfg.model.name}' is already pretrained (path={cfg.model.path}); "
                          "pretraining builds the lab's own base: use model=tiny")
    check_batches(cfg)


def check_batches(cfg: DictConfig) -> int:
    """The micro-batch size per process (pretrain.batch_size over processes and micro-batches, exactly)."""
    p = cfg.pretrain
    per_device = exact_div(p.batch_size, world_size(), "pretrain.batch_size over processes")
    return exact_div(per_device, p.micro_batches, "pretrain.batch_size per process over pretrain.micro_batches")


@stage_function(STAGE, base_dir, "{steps} steps, {wall_time_s:.0f} s", check=check)
def pretrain(cfg: DictConfig, run: Run) -> None:
    """Pretrain (or resume, or find finished) the base: `pretrain(cfg, named=True)` returns its directory;
    `named=False` when another stage needs it on the way (its directory then ignores that stage's `name=`)."""
    out, p = run.out, cfg.pretrain
    manifest = read_manifest(out)  # an interrupted run's (resumed), or None
    micro = check_batches(cfg)
    run.start(resume=True, started_at=(manifest or {}).get("started_at", _now()))
    started = run.started

    # 1-2. corpus and tokenizer (the main process trains and saves it, the others load it)
    world = World(cfg.world)
    # Kept with the resumable checkpoints, published as ONE directory (a rename: all of it or none), never
    # in the run directory, whose final files a kill during the final save may leave half replaced.
    saved_tokenizer = out / "trainer" / "tokenizer"
    with process_state().main_process_first():
        if saved_tokenizer.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer)
        else:
            texts = world.corpus(p.tokenizer_docs, seed=f"tokenizer/{p.seed}")
            tokenizer = train_tokenizer(texts, cfg.model.vocab_size, cfg.model.split_digits)
            publish(out / "trainer", lambda tmp: tokenizer.save_pretrained(tmp / "tokenizer"))
    data = tokenize(world.corpus(p.steps * p.batch_size, seed=p.seed), tokenizer, cfg.model.max_seq_len)

    # 3. model (seeded: the initial weights are a function of pretrain.seed)
    set_seed(p.seed)
    model = build_base_model(cfg.model, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # 4. train
    args = hf_args(TrainingArguments, cfg, out, seed=p.seed, lr=p.lr, batch_size=micro, max_steps=p.steps,
                   gradient_accumulation_steps=p.micro_batches,
                   lr_scheduler_type="cosine", warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
                   logging_steps=p.log_every, save_strategy="steps", save_steps=p.save_every, save_total_limit=1,
                   include_num_input_tokens_seen="non_padding")
    trainer = SortedBatchTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[ManifestCallback(out, started, (manifest or {}).get("wall_time_s", 0.0))])
    tracking.quiet(trainer)
    last = last_complete_checkpoint(Path(args.output_dir))
    if last:
        # a checkpoint holds a tied embedding once (safetensors drops the shared lm_head weight): declared, the
        # Trainer re-ties it on resume instead of warning that the weight is missing
        if model.config.tie_word_embeddings:
            model._keys_to_ignore_on_save = list(model._tied_weights_keys or {})
        trainer.log_carry = read_log_carry(last, args.process_index)
        note(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)

    # 5. save (main process); the trainer's optimizer checkpoints are only for resuming
    if trainer.is_world_process_zero():
        # one row per logging step; not the trainer's end-of-session summary (its train_loss averages only
        # this process's steps: a resumed run's would differ from an uninterrupted one's)
        log = [r for r in trainer.state.log_history if "train_loss" not in r]

        def save(tmp: Path) -> None:
            trainer.save_model(str(tmp))
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is config.yaml
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

        publish(out, save)
    # wall time: the interrupted runs' kept work (the manifest's, as of their last save) plus this session's
    run.finish(steps=trainer.state.global_step, sequences_seen=trainer.state.global_step * p.batch_size,
               tokens_seen=int(trainer.state.num_input_tokens_seen),
               final_loss=next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None),
               parameters=model.num_parameters(), finished_at=_now(), world_size=world_size())
    if trainer.is_world_process_zero():
        shutil.rmtree(args.output_dir, ignore_errors=True)
        note(f"saved {out}")


def last_complete_checkpoint(trainer_dir: Path) -> Optional[str]:
    """The newest checkpoint-N that was saved completely (Trainer writes trainer_state.json last).

    A kill DURING a save leaves a newer, partial checkpoint-N; transformers' get_last_checkpoint
    would pick it and fail to resume. The previous one is still there (rotation runs after a save).
    """
    done = [d for d in trainer_dir.glob("checkpoint-*") if (d / "trainer_state.json").is_file()]
    return str(max(done, key=lambda d: int(d.name.split("-")[1]))) if done else None


class SortedBatches(Sampler):
    """A seeded random order of the corpus in which each optimiser step's `batch` sequences are sorted by
    length: its micro-batches (gradient accumulation; the loss is normalised by the step's token count)
    then hold sequences of similar length. The same step as one padded batch, with less padding (documents
    of 3-90 tokens). transformers' BatchRebalanceSampler does this with micro-batches of varying size
    and its own fixed shuffle seed; here the order follows pretrain.seed and micro-batches are equal."""

    def __init__(self, lengths: list[int], batch: int, seed: int):
        self.lengths, self.batch, self.seed = lengths, batch, seed

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        for i in range(0, len(order), self.batch):
            yield from sorted(order[i:i + self.batch], key=lambda j: (self.lengths[j], j))


class SortedBatchTrainer(Trainer):
    """Trainer with SortedBatches, and a logging interval that survives a resume. A logged loss is the mean over
    the steps since the last log; a save between two logs (save_every not a multiple of log_every) keeps the
    interval's loss sum so far and its first step (log_carry_<process>.json, written before trainer_state.json,
    which marks the checkpoint complete), and the resumed run starts its interval from them: its rows are
    an uninterrupted run's, bit for bit (x + y == y + x in floating point: the sums add in the same order)."""

    log_carry: Optional[dict] = None  # set before train(resume_from_checkpoint=...): read_log_carry(checkpoint)

    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        data = train_dataset if train_dataset is not None else self.train_dataset
        a = self.args
        batch = a.train_batch_size * a.gradient_accumulation_steps * max(1, a.world_size)
        return SortedBatches([len(x) for x in data["input_ids"]], batch, a.data_seed)

    def training_step(self, *args, **kwargs):
        if self.log_carry is not None:  # the first micro-batch after a resume: before its loss is added
            carry, self.log_carry = self.log_carry, None
            self._tr_loss += torch.tensor(carry["loss_sum"], dtype=self._tr_loss.dtype, device=self._tr_loss.device)
            self._globalstep_last_logged = int(carry["last_logged"])
        return super().training_step(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        carry = {"loss_sum": self._tr_loss.item(), "last_logged": self._globalstep_last_logged}
        (folder / f"log_carry_{self.args.process_index}.json").write_text(json.dumps(carry) + "\n")
        super()._save_checkpoint(model, trial)


def read_log_carry(checkpoint: str, process: int) -> dict:
    """A resumable checkpoint's logging interval so far (SortedBatchTrainer); one line when it is damaged."""
    path = Path(checkpoint) / f"log_carry_{process}.json"
    carry = read_record(path, f"repair: rm -r {Path(checkpoint)} and rerun the command (it resumes from the "
                              "previous checkpoint or restarts)")
    if carry is None:  # a checkpoint saved by an older lab: the resumed run's first logged loss averages fewer steps
        print(f"warning: {path} is missing: the first loss logged after the resume averages only the steps since "
              "it", file=sys.stderr)
        return None
    if not isinstance(carry.get("loss_sum"), (int, float)) or not isinstance(carry.get("last_logged"), int):
        raise ConfigError(f"{path} is damaged (not the loss sum and step the lab writes); repair: "
                          f"rm -r {Path(checkpoint)} and rerun the command")
    return carry


class ManifestCallback(TrainerCallback):
    """At every resumable save, record the steps and wall time that the save keeps."""

    def __init__(self, out: Path, started: float, previous_wall_time: float):
        self.out, self.started, self.previous = out, started, previous_wall_time

    def on_step_end(self, args, state, control, **kwargs):
        fault(f"step:{STAGE}:{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_manifest(self.out, {**(read_manifest(self.out) or {}), "steps": state.global_step,
                                      "wall_time_s": self.previous + time.time() - self.started})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
