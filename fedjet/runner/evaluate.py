"""Held-out evaluation of global weights: the job's model rebuilt from the spec, fixed windows.

The evaluation text is ``--eval-data PATH`` (any format the workers read) or the evaluation
split of the WikiText corpus the demo deals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedjet.data.batches import eval_windows
from fedjet.data.packing import pack_documents
from fedjet.data.readers import read_documents
from fedjet.data.wikitext import Corpus, load_corpus
from fedjet.models.build import pick_device
from fedjet.models.job_model import JobModel, job_model_for
from fedjet.spec import JobSpec
from fedjet.worker.train import EvalResult, evaluate


@dataclass
class Evaluator:
    job_model: JobModel
    windows: np.ndarray
    device: torch.device
    source: str
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        spec: JobSpec,
        *,
        eval_tokens: int,
        eval_data: str | None = None,
        corpus: Corpus | None = None,
        data: str | None = None,
        model_path: str | None = None,
        device: str | None = None,
    ) -> Evaluator:
        """``eval_data`` first; else the evaluation split of ``corpus`` (or of the corpus at ``data``)."""
        notes: list[str] = []
        if eval_data is not None:
            documents = read_documents(eval_data)
            docs, source = documents.docs, documents.source
        else:
            corpus = corpus or load_corpus(data)
            docs, source = [a.text for a in corpus.eval], corpus.source
            notes += [corpus.note] if corpus.note else []
        job_model = job_model_for(spec, model_path)
        packed = pack_documents(docs, job_model.tokenizer, spec.config.train.seq_len)
        windows = eval_windows(packed.ids, spec.config.train.seq_len, eval_tokens)
        target = pick_device(device)
        job_model.model.to(target)
        return cls(job_model, windows, target, source, notes)

    def evaluate(self, weights: dict[str, torch.Tensor]) -> EvalResult:
        self.job_model.load(weights)
        return evaluate(self.job_model.model, self.windows, self.device)
