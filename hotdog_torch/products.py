"""What the fused steps' matrix products run in, and a layer's gradient kept as its factors.

FP32 takes every product in fp32 (TF32 on a CUDA GPU that allows it).  BF16 takes them in bf16, which a CPU with
AVX-512 BF16 or AMX computes about three times faster: the operands rounded to bf16 (8 significant bits), each
product summed in fp32 inside the GEMM and rounded to bf16 once, then widened.  Everything else stays fp32: the
master weights, the velocity, the biases, the update, the activations, the last sigmoid and the cost.  Only the
arithmetic differs; the step (step.backward, step.FusedSGD) is the same for both.
"""

from __future__ import annotations

import torch

BF16 = torch.bfloat16


class Product:
    """A layer's gradient δᵀa (and Σδ for its bias) kept as its two factors: added into a tensor by one GEMM."""

    def __init__(self, delta: torch.Tensor, a: torch.Tensor):
        self.delta, self.a = delta, a

    def into(self, t: torch.Tensor, alpha: float) -> None:
        t.addmm_(self.delta.t(), self.a, alpha=alpha)  # t <- t + alpha · δᵀa

    def bias_into(self, t: torch.Tensor, alpha: float) -> None:
        t.add_(self.delta.sum(0), alpha=alpha)

    def scale_(self, c: torch.Tensor) -> None:
        self.delta = self.delta * c  # δ scaled scales both δᵀa and Σδ

    def sq_norm(self) -> torch.Tensor:
        """‖δᵀa‖² + ‖Σδ‖²: through the Gram matrices, Σ (δδᵀ ⊙ aaᵀ), when they are the smaller products."""
        d, a = self.delta, self.a
        if len(d) * (d.shape[1] + a.shape[1]) < d.shape[1] * a.shape[1]:
            w = ((d @ d.t()) * (a @ a.t())).sum()
        else:
            w = (d.t() @ a).square().sum()
        return w + d.sum(0).square().sum()


class FP32:
    """Every product in the tensors' own dtype, as the fused step has always taken them."""

    name = "fp32"

    def linear(self, a: torch.Tensor, layer) -> torch.Tensor:
        return torch.addmm(layer.bias, a, layer.weight.t())  # z = a Wᵀ + b

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    def product(self, delta: torch.Tensor, a: torch.Tensor) -> Product:
        return Product(delta, a)


class Bf16Product(Product):
    """A layer's gradient whose product δᵀa is taken in bf16; Σδ, and whatever δᵀa is added into, in fp32."""

    def __init__(self, products: BF16Products, delta: torch.Tensor, a: torch.Tensor):
        super().__init__(delta, a)
        self.products = products

    def into(self, t: torch.Tensor, alpha: float) -> None:
        t.add_(self.products.gradient(self.delta, self.a), alpha=alpha)


class BF16Products:
    """The products in bf16, their results in fp32.  The bf16 operands and the gradient's two buffers are kept from
    step to step, one of each shape: a 100 MB layer's fresh 50 MB copy costs four times its copy into a kept buffer
    (the page faults), and a mixed bf16 + fp32 add_ is seven times slower than widening first.  Each buffer is
    consumed by the product that follows its copy, so layers of one shape can share it."""

    name = "bf16"

    def __init__(self):
        self.kept: dict = {}

    def low(self, t: torch.Tensor, role: str, dtype=BF16) -> torch.Tensor:
        """A buffer of t's shape and layout in dtype, t copied into it when given."""
        key = (role, t.shape, t.stride(), t.device, dtype)
        if key not in self.kept:
            self.kept[key] = torch.empty_like(t, dtype=dtype)  # preserve_format: a transposed view stays one
        return self.kept[key].copy_(t)

    def linear(self, a: torch.Tensor, layer) -> torch.Tensor:
        return self.mm(a, layer.weight.t()).add_(layer.bias)  # z = a Wᵀ + b, the bias added in fp32

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.mm(self.low(a, "a"), self.low(b, "b")).float()

    def product(self, delta: torch.Tensor, a: torch.Tensor) -> Bf16Product:
        return Bf16Product(self, delta, a)

    def gradient(self, delta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """δᵀa in bf16 into its kept buffer, widened into a kept fp32 one."""
        d16, a16 = self.low(delta.t(), "a"), self.low(a, "b")
        key = ("δᵀa", d16.shape[0], a16.shape[1], a.device)
        if key not in self.kept:
            self.kept[key] = torch.empty(d16.shape[0], a16.shape[1], dtype=BF16, device=a.device)
        g16 = torch.mm(d16, a16, out=self.kept[key])
        wide = key + ("fp32",)
        if wide not in self.kept:
            self.kept[wide] = torch.empty(g16.shape, device=a.device)
        return self.kept[wide].copy_(g16)


def products(precision: str) -> FP32 | BF16Products:
    """The arithmetic of a fused step in this precision (runtime.precision's: fp32 or bf16)."""
    return BF16Products() if precision == "bf16" else FP32()


FULL = FP32()  # the default arithmetic of every fused step: it keeps nothing, so one serves all
