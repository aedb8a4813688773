"""A data mixture with phases (mid-training): each row comes from one named source, drawn in proportion to
the weights of the phase the run is in; token counts per source are logged (`tokens/NAME`).

OLMo 2 (OLMo et al. 2024, sec. 4) trains on web-scale data, then anneals the learning rate on a smaller
high-quality mix ("Dolmino"); with the WSD schedule the same switch is a phase starting at the decay.
Phases start at fractions of max_steps; the step is the number of batches drawn // grad_accum, so the
schedule needs no help from the loop, and the state (generator, counts, every source's position)
resumes exactly. The state keeps its grad_accum: a run resumed with another one counts the steps done as
if drawn at the new grad_accum, so each phase still starts at its step.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.train.data import BatchSampler


class MixtureSource:
    def __init__(self, sources: dict[str, BatchSampler], phases: list[tuple[int, list[float]]], *,
                 batch_size: int, grad_accum: int, seed: int):
        """sources: name -> a sampler of batch_size 1; phases: (first step, weights per source) in order."""
        self.names, self.samplers = list(sources), list(sources.values())
        self.phases = [(start, torch.tensor(w, dtype=torch.float64)) for start, w in phases]
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = 0
        self.tokens = [0] * len(self.names)

    def phase_at(self, step: int) -> int:
        return max(i for i, (start, _) in enumerate(self.phases) if start <= step)

    def next_batch(self) -> dict[str, torch.Tensor]:
        weights = self.phases[self.phase_at(self.batches // self.grad_accum)][1]
        picks = torch.multinomial(weights, self.batch_size, replacement=True, generator=self.gen).tolist()
        xs, ys = [], []
        for i in picks:
            x, y = self.samplers[i].next()
            xs.append(x)
            ys.append(y)
            self.tokens[i] += x.numel()
        self.batches += 1
        return {"input_ids": torch.cat(xs), "targets": torch.cat(ys)}

    def log_stats(self) -> dict[str, float]:
        """Tokens drawn so far from each source, and the phase of the last step's rows (for metrics.jsonl)."""
        last_step = max(self.batches - 1, 0) // self.grad_accum  # the step whose rows were drawn last
        return {**{f"tokens/{n}": t for n, t in zip(self.names, self.tokens)}, "mix_phase": self.phase_at(last_step)}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "batches": self.batches, "grad_accum": self.grad_accum,
                "names": list(self.names), "tokens": list(self.tokens),
                "sources": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each source's position and token count come back by its name, so a run resumed with a source added,
        dropped or moved goes on: an added one starts at its beginning, counted from 0. (By position, an added
        source's count lay past the saved list, an IndexError at its first row, and a moved one took another's
        position.) A state saved before the names were is read by position."""
        self.gen.set_state(state["gen"])
        # (a state saved before grad_accum was: taken as this one's)
        steps, rest = divmod(state["batches"], state.get("grad_accum", self.grad_accum))
        self.batches = steps * self.grad_accum + rest
        saved = dict(zip(state.get("names", self.names), zip(state["tokens"], state["sources"])))
        self.tokens = [saved[n][0] if n in saved else 0 for n in self.names]
        for name, sampler in zip(self.names, self.samplers):
            if name in saved:
                sampler.load_state_dict(saved[name][1])
