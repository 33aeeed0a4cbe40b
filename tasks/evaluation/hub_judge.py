"""A judge that is a model: a classifier from the hub or a local directory (``data.judge.second=hub:<id>``).

Two kinds of judge models go through the same interface (``judge(prompts, responses) -> list[bool]``):

- a **sequence classifier** (``*ForSequenceClassification``, e.g. a refusal or language-ID classifier):
  it reads (prompt, response) as a text pair; the answer shows the behaviour when ``data.judge.hub_flag``
  is its most probable label (multi-label models: when that label's sigmoid is above 0.5). ``hub_flag``
  empty picks the one label whose name holds "refus" (refusal) or is the language's code (language);
- a **causal LM judge** (HarmBench- or LlamaGuard-style): the pair is written into ``hub_template``
  (``{prompt}`` and ``{response}``; empty: the judge's own chat template on a user and an assistant turn,
  as LlamaGuard reads a conversation), and the answer shows the behaviour when the first token of
  ``hub_flag`` is more probable next than the first token of ``hub_other`` (LlamaGuard judging refusals:
  flag "safe", other "unsafe"; HarmBench's classifier: flag "No", other "Yes").

It runs where the evaluation runs: on the model worker's device, so on a GPU worker on a cluster
(bfloat16 there, float32 on CPU), in batches of ``hub_batch_size``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from tasks.core.concept_config import JudgeConfig
from tasks.core.errors import CompalignError

log = logging.getLogger("compalign.judges")
HUB_PREFIX = "hub:"


def hub_source(second: str) -> str | None:
    """The model id or path of a ``hub:<id>`` second judge (None for the other kinds)."""
    return second.removeprefix(HUB_PREFIX) if second.startswith(HUB_PREFIX) else None


class HubJudge:
    """A judge model, loaded once; ``judge`` returns True where the answer shows the behaviour."""

    name = "hub"

    def __init__(self, cfg: JudgeConfig, device: str | torch.device = "cpu") -> None:
        from transformers import AutoConfig, AutoTokenizer

        source = hub_source(cfg.second)
        if not source:
            raise CompalignError(f"data.judge.second must be hub:<model id or path>, got {cfg.second!r}")
        self.cfg, self.source, self.device = cfg, source, torch.device(device)
        options = {"revision": cfg.hub_revision}
        try:
            config = AutoConfig.from_pretrained(source, **options)
            self.tokenizer = AutoTokenizer.from_pretrained(source, **options)
        except (OSError, ValueError) as exc:
            raise CompalignError(
                f"cannot load the judge model of data.judge.second={cfg.second!r}: {exc}; give a local "
                "directory or a hub id available to this machine (HF_HOME cache, or network)"
            ) from exc
        self.classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.classifier:
            from transformers import AutoModelForSequenceClassification as Auto
        else:
            from transformers import AutoModelForCausalLM as Auto
        self.model = Auto.from_pretrained(source, dtype=dtype, **options).to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._decide = self._classifier_setup(config) if self.classifier else self._causal_setup()
        log.info(
            "judge model %s on %s (%s)", source, self.device, "classifier" if self.classifier else "causal LM"
        )

    # ------------------------------------------------------------------ sequence classifiers

    def _classifier_setup(self, config):
        labels = {int(i): str(name) for i, name in config.id2label.items()}
        wanted = self.cfg.hub_flag
        if wanted:
            found = [i for i, name in labels.items() if name.lower() == wanted.lower()]
        else:
            refusal, code = self.cfg.kind == "refusal", self.cfg.language.lower()
            found = [
                i
                for i, name in labels.items()
                if ("refus" in name.lower() if refusal else name.lower() == code)
            ]
        if len(found) != 1:
            raise CompalignError(
                f"the judge model {self.source} has labels {sorted(labels.values())}; set data.judge.hub_flag "
                "to the one label that means the behaviour is shown"
            )
        self.flag_index = found[0]
        self.tokenizer.padding_side = "right"  # positions from 0 in every row; the head finds the last token
        multi = config.problem_type == "multi_label_classification"

        def decide(batch_prompts: list[str], batch_responses: list[str]) -> list[bool]:
            enc = self.tokenizer(
                batch_prompts, batch_responses, padding=True, truncation=True,
                max_length=self.cfg.hub_max_length, return_tensors="pt",
            ).to(self.device)  # fmt: skip
            logits = self.model(**enc).logits.float()
            if multi:
                return (torch.sigmoid(logits[:, self.flag_index]) > 0.5).tolist()
            return (logits.argmax(dim=-1) == self.flag_index).tolist()

        return decide

    # ------------------------------------------------------------------ causal LM judges

    def _causal_setup(self):
        cfg = self.cfg
        if not cfg.hub_flag or not cfg.hub_other:
            raise CompalignError(
                f"the judge model {self.source} is a causal LM: set data.judge.hub_flag and data.judge.hub_other "
                "to the two answer words it chooses between (LlamaGuard judging refusals: safe / unsafe)"
            )
        if not cfg.hub_template and not getattr(self.tokenizer, "chat_template", None):
            raise CompalignError(
                f"the judge model {self.source} has no chat template: set data.judge.hub_template to its "
                "prompt, with {prompt} and {response} where the pair goes"
            )
        ids = [
            self.tokenizer.encode(word, add_special_tokens=False) for word in (cfg.hub_flag, cfg.hub_other)
        ]
        if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
            raise CompalignError(
                f"data.judge.hub_flag={cfg.hub_flag!r} and data.judge.hub_other={cfg.hub_other!r} must start with "
                "different tokens of the judge's tokenizer"
            )
        flag_id, other_id = ids[0][0], ids[1][0]
        self.tokenizer.padding_side = "left"  # the next token is read at the last position of every row

        def decide(batch_prompts: list[str], batch_responses: list[str]) -> list[bool]:
            texts = [self.render(p, r) for p, r in zip(batch_prompts, batch_responses, strict=True)]
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.cfg.hub_max_length,
                return_tensors="pt", add_special_tokens=bool(self.cfg.hub_template),  # chat templates hold BOS
            ).to(self.device)  # fmt: skip
            # Left padding shifts positions: number them from each row's first real token.
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = self.model(**enc, position_ids=positions).logits[:, -1].float()
            return (logits[:, flag_id] > logits[:, other_id]).tolist()

        return decide

    def render(self, prompt: str, response: str) -> str:
        """The causal judge's input for one pair."""
        if self.cfg.hub_template:
            return self.cfg.hub_template.replace("{prompt}", prompt).replace("{response}", response)
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    # ------------------------------------------------------------------ the interface

    @torch.no_grad()
    def judge(self, prompts: list[str], responses: list[str]) -> list[bool]:
        out: list[bool] = []
        size = self.cfg.hub_batch_size
        for start in range(0, len(responses), size):
            out += self._decide(prompts[start : start + size], responses[start : start + size])
        return out


def hub_judge_version(cfg: JudgeConfig) -> str:
    """The judge model's identity for the evaluation spec: a local directory's content digest (config,
    tokenizer and weights; weights over 1 GiB by their safetensors header and size), or the hub id at the
    commit its cache resolves (the revision asked for, when it is not cached here)."""
    source = hub_source(cfg.second) or ""
    settings = (
        f"flag={cfg.hub_flag}|other={cfg.hub_other}|template={cfg.hub_template}|len={cfg.hub_max_length}"
    )
    path = Path(source).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, revision=cfg.hub_revision, local_files_only=True))
        except Exception:  # not cached here: the id and revision are all there is to name it by
            return f"{source}@{cfg.hub_revision or 'main'}|{_short(settings.encode())}"
    digest = hashlib.sha256(settings.encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(file.relative_to(path).as_posix().encode())
        size = file.stat().st_size
        if size > 1 << 30 and file.suffix == ".safetensors":
            with file.open("rb") as handle:
                head = handle.read(8)
                digest.update(head + handle.read(int.from_bytes(head, "little")) + str(size).encode())
        else:
            digest.update(file.read_bytes())
    return f"local-{digest.hexdigest()[:12]}"  # by content: the same judge copied elsewhere compares equal


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]
