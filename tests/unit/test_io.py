"""Atomic, byte-reproducible safetensors writes (longlive.io)."""

import subprocess
import sys

import torch
from safetensors import safe_open

from longlive.io import save_safetensors

SCRIPT = """
import sys, torch
from longlive.io import save_safetensors
torch.manual_seed(0)
save_safetensors({"w": torch.randn(4, 16), "b": torch.zeros(3, dtype=torch.uint8)}, sys.argv[1],
                 metadata={"format": "nvfp4", "backend": "emulated", "scale_rule": "six", "zeta": "1"})
"""


def test_the_same_tensors_give_the_same_bytes_in_every_process(tmp_path):
    # safetensors orders metadata from a hash map seeded per process: without sorting, two processes
    # wrote two different files for the same model (seen as a DVC output changing on a rerun)
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", SCRIPT, str(p)], check=True)
    data = {p.read_bytes() for p in paths}
    assert len(data) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {"format": "nvfp4", "backend": "emulated", "scale_rule": "six", "zeta": "1"}
        torch.manual_seed(0)
        assert torch.equal(f.get_tensor("w"), torch.randn(4, 16))
        assert f.get_tensor("b").dtype == torch.uint8


def test_a_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_safetensors({"w": torch.ones(2)}, p)
    before = p.read_bytes()
    try:
        save_safetensors({"w": "not a tensor"}, p)
    except Exception:
        pass
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["m.safetensors"]
