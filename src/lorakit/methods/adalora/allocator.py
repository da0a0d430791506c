"""AdaLoRA's budget schedule and rank allocator (Zhang et al. 2023, §3; PEFT's `RankAllocator`).

Called once per optimizer step, after the step and before gradients are cleared
(`AdapterModel.update_and_allocate`, run by the training job's callback):

- every parameter of the adapter gets an importance I = |w · ∂L/∂w|, smoothed
  Ī ← β1 Ī + (1 − β1) I, with uncertainty Ū ← β2 Ū + (1 − β2) |I − Ī|; score s = Ī · Ū;
- a triplet's (row i of E, row i of A, column i of B) score is s(E_i) + mean s(A_i) + mean s(B_i);
- the budget (total kept triplets) stays at init_r × modules for `tinit` steps, then falls
  cubically to target_r × modules by step total_step − tfinal; every `deltaT` steps the
  lowest-scored triplets beyond the budget get E_i = 0;
- at step total_step − tfinal the final mask is fixed (rank_pattern) and the scores dropped;
  after it, the fixed mask is re-applied every step.

The order of parameters and every formula follow PEFT's, so the same seed and data give
the same rank pattern (tests/methods/test_adalora.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.methods.adalora.config import AdaLoraConfig


class RankAllocator:
    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str):
        self.config, self.adapter_name = config, adapter_name
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        names = sorted({n.replace("lora_A", "%s") for n, _ in self._params(model, "lora_A")})
        self.init_bgt = sum(p.size(0) for _, p in self._params(model, "lora_A"))
        self.target_bgt = config.target_r * len(names)

    def _params(self, model: nn.Module, kind: str = "lora_"):
        marker = f"{kind}.{self.adapter_name}" if kind != "lora_" else kind
        return [(n, p) for n, p in model.named_parameters() if marker in n and self.adapter_name in n]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * mul ** 3 + self.target_bgt), step % c.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for n, p in self._params(model):
                if p.grad is None:
                    continue
                if n not in self.ipt:
                    self.ipt[n], self.exp_avg_ipt[n], self.exp_avg_unc[n] = (torch.zeros_like(p) for _ in range(3))
                self.ipt[n] = (p * p.grad).abs().detach()
                self.exp_avg_ipt[n] = b1 * self.exp_avg_ipt[n] + (1 - b1) * self.ipt[n]
                self.exp_avg_unc[n] = b2 * self.exp_avg_unc[n] + (1 - b2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs()

    def _score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the E rows of the lowest-scored triplets beyond `budget`; {E parameter name: kept rows}."""
        vectors: dict[str, list[torch.Tensor]] = {}
        values: dict[str, torch.Tensor] = {}
        for n, _ in self._params(model):
            if f"lora_A.{self.adapter_name}" in n:
                vectors.setdefault(n.replace("lora_A", "%s"), []).append(self._score(n).mean(dim=1, keepdim=True))
            elif f"lora_B.{self.adapter_name}" in n:
                vectors.setdefault(n.replace("lora_B", "%s"), []).append(self._score(n).mean(dim=0).view(-1, 1))
            elif f"lora_E.{self.adapter_name}" in n:
                values[n.replace("lora_E", "%s")] = self._score(n)
        if budget >= self.init_bgt:  # nothing to prune (PEFT's kthvalue would fail on k = 0)
            return {n: [True] * p.shape[0] for n, p in self._params(model, "lora_E")}
        triplets, scores = {}, []
        for key, parts in vectors.items():
            total = values[key].view(-1) + torch.cat(parts, dim=1).sum(dim=1).view(-1)
            triplets[key % "lora_E"] = total.view(-1, 1)
            scores.append(total.view(-1))
        threshold = torch.kthvalue(torch.cat(scores), k=self.init_bgt - budget)[0].item()
        pattern = {}
        with torch.no_grad():
            for n, p in self._params(model, "lora_E"):
                p.masked_fill_(triplets[n] <= threshold, 0.0)
                pattern[n] = (~(triplets[n] <= threshold)).view(-1).tolist()
        return pattern

    def mask_using_rank_pattern(self, model: nn.Module, pattern: dict[str, list[bool]]) -> None:
        with torch.no_grad():
            for n, p in self._params(model, "lora_E"):
                kept = torch.tensor(pattern[n.replace(f".{self.adapter_name}", "")], device=p.device)
                p.masked_fill_(~kept[:, None], 0.0)

    def update_and_allocate(self, model: nn.Module, step: int, force_mask: bool = False):
        if step < self.config.total_step - self.config.tfinal:
            self.update_ipt(model)
        budget, mask = self.budget_schedule(step)
        return budget, self.mask_to_budget(model, budget) if mask or force_mask else None
