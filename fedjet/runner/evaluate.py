"""Held-out evaluation of global weights: the model rebuilt from the job spec, fixed windows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedjet.data.batches import encode_articles, eval_windows
from fedjet.data.shards import make_tokenizer
from fedjet.data.wikitext import Corpus, load_corpus
from fedjet.spec import JobSpec
from fedjet.worker.model import load_parameters, model_from_config, pick_device, quiet_transformers
from fedjet.worker.train import EvalResult, evaluate


@dataclass
class Evaluator:
    model: torch.nn.Module
    windows: np.ndarray
    device: torch.device
    source: str
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, spec: JobSpec, data: str | None, eval_tokens: int, device: str | None = None) -> Evaluator:
        return cls.from_corpus(spec, load_corpus(data), eval_tokens, device)

    @classmethod
    def from_corpus(cls, spec: JobSpec, corpus: Corpus, eval_tokens: int, device: str | None = None) -> Evaluator:
        quiet_transformers()
        tokens = encode_articles(corpus.eval, make_tokenizer(spec.tokenizer))
        windows = eval_windows(tokens, spec.config.train.seq_len, eval_tokens)
        target = pick_device(device)
        model = model_from_config(spec.model_config).to(target)
        return cls(model, windows, target, corpus.source, [corpus.note] if corpus.note else [])

    def evaluate(self, weights: dict[str, torch.Tensor]) -> EvalResult:
        load_parameters(self.model, weights)
        return evaluate(self.model, self.windows, self.device)
