"""
Muon: momentum SGD whose update is orthogonalized by a Newton-Schulz iteration (Keller Jordan et al. 2024,
"Muon: An optimizer for hidden layers in neural networks"). Used for the 2-D weight matrices inside blocks;
GPT.setup_optimizers gives everything else to AdamW.

Under DDP the gradients are already averaged by the time step() runs, so every rank computes the same
update; that redundancy keeps the optimizer one simple loop.

    from nanochat.muon import Muon
    opt = Muon(matrix_params, lr=0.02, momentum=0.95)
"""

import torch


def zeropower_via_newtonschulz5(G, steps=5):
    """
    Approximately replace G by U V^T from its SVD G = U S V^T (all singular values pushed towards 1).
    Quintic iteration with coefficients chosen for a fast rise near zero; it does not converge exactly to 1
    (singular values end up roughly in [0.7, 1.2]), which does not hurt training. bf16 on GPU, fp32 elsewhere.
    """
    assert G.ndim >= 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # the spectral norm is at most the Frobenius norm, so this puts every singular value in [0, 1]
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes 2-D matrices, got a parameter of shape {tuple(p.shape)}")
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                g = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz5(g, steps=group["ns_steps"])
                # keep the RMS of the update comparable across aspect ratios
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)
