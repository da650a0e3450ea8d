"""ONNX Runtime as a baseline: a fastddpm U-Net's weights in diffusers' UNet2DModel, exported with
torch.onnx (the TorchScript exporter: the dynamo one would need onnxscript) at one fixed input
shape, run by ONNX Runtime's CPU provider with every graph optimisation on."""
from __future__ import annotations

import numpy as np

ORT_THREADS = 2        # the same intra-op thread count as the engine and torch in the suites


def export_unet(unet_config, weights: dict, path: str, shape: tuple) -> None:
    """Write diffusers' UNet2DModel with these weights as ONNX at `path`; inputs x [shape] and
    t [1] float32 (broadcast over the batch), output "out"."""
    import diffusers
    import torch
    with torch.device("meta"):
        model = diffusers.UNet2DModel.from_config(unet_config.to_dict())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True, assign=True)
    model.eval()

    class Out(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t):
            return self.m(x, t).sample

    torch.onnx.export(Out(model), (torch.zeros(shape), torch.tensor([1.0])), path, input_names=["x", "t"],
                      output_names=["out"], dynamo=False, opset_version=17)


def session(path: str, threads: int = ORT_THREADS):
    """An ONNX Runtime CPU session of `path`: `threads` intra-op threads, all graph optimisations."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def forward(sess, x: np.ndarray, t: float) -> np.ndarray:
    """One U-Net forward of x (float32 [B, C, H, W], the exported shape) at timestep t."""
    return sess.run(None, {"x": x, "t": np.array([t], np.float32)})[0]
