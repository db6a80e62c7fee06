#!/usr/bin/env python3
"""Writes the PyTorch peer data for tests/nn/peer_test.cpp.

Run on a machine with PyTorch and safetensors (the GPU machine has both):

    python3 scripts/make_peer_data.py tests/data

It writes, with the real `safetensors` library:
  peer_mlp_relu.safetensors  nn.Sequential(Linear(32,64), ReLU(), Linear(64,64), ReLU(),
                             Linear(64,16)).state_dict(), float32, by safetensors.torch.save_file
  peer_mlp_gelu.safetensors  the same with GELU() (exact, erf), other weights
  peer_io.safetensors        "input" float32 [8, 32]; "output_relu", "output_gelu"
                             float64 [8, 16]: each model run by PyTorch in float64
                             (the float32 weights and input cast up)
about 60 KB in all. The seed is fixed, so a re-run writes the same values on the same
PyTorch version; the versions used are recorded in each file's metadata.
"""
import argparse
import copy
import os
import sys

import torch
from safetensors.torch import load_file, save_file

SEED = 20261124
SIZES = (32, 64, 64, 16)
BATCH = 8


def build(act_cls):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i + 2 < len(SIZES):
            layers.append(act_cls())
    return torch.nn.Sequential(*layers).float()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write into (tests/data)")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(SEED)
    meta = {
        "format": "pt",
        "generator": "scripts/make_peer_data.py",
        "torch": torch.__version__,
        "seed": str(SEED),
    }
    x = torch.rand(BATCH, SIZES[0], dtype=torch.float32) * 2 - 1
    io = {"input": x.contiguous()}
    for name, act in (("relu", torch.nn.ReLU), ("gelu", torch.nn.GELU)):
        model = build(act).eval()
        path = os.path.join(args.out_dir, f"peer_mlp_{name}.safetensors")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, path, metadata={**meta, "activation": name,
                                         "sizes": "-".join(map(str, SIZES))})
        with torch.no_grad():
            y = copy.deepcopy(model).double()(x.double())
        io[f"output_{name}"] = y.contiguous()
        # Read back what was written: the file must hold exactly the model.
        back = load_file(path)
        assert sorted(back) == sorted(state), (sorted(back), sorted(state))
        for k in state:
            assert torch.equal(back[k], state[k]), k
        print(f"wrote {path}: {sorted(state)} ({os.path.getsize(path)} bytes)")
    path = os.path.join(args.out_dir, "peer_io.safetensors")
    save_file(io, path, metadata=meta)
    print(f"wrote {path}: input {list(x.shape)} f32, outputs {list(io['output_relu'].shape)} "
          f"f64 ({os.path.getsize(path)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
