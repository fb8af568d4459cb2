"""Text encoders: a tiny built-in one for the synthetic presets, and UMT5 from a local directory.

Both return Wan-style conditioning: ``(B, max_tokens, dim)`` float32 embeddings that are zero past
each prompt's length, plus the ``(B, max_tokens)`` bool mask of real tokens.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from longlive.io import atomic_dir
from longlive.config import ConfigError, TextConfig


@runtime_checkable
class TextEncoder(Protocol):
    dim: int
    max_tokens: int

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]: ...


def _zero_padding(emb: Tensor, mask: Tensor) -> Tensor:
    return emb.float() * mask.unsqueeze(-1)


# ----------------------------------------------------------------------------- tiny


WORDS = (
    "red green blue yellow cyan magenta white orange "  # colours
    "circle square triangle "  # shapes
    "a an the moves left right up down stays still and then"  # motions and glue
).split()
NUM_BUCKETS = 64


class WordTokenizer:
    """Lowercase, split on non-letters; known words get fixed ids, unknown ones a stable hash bucket."""

    PAD, UNK = 0, 1  # an empty prompt encodes as the single <unk>, so it still has a (null) embedding

    def __init__(self, words: list[str] = WORDS, num_buckets: int = NUM_BUCKETS):
        self.words, self.num_buckets = list(words), num_buckets
        self.ids = {w: i + 2 for i, w in enumerate(self.words)}
        self.vocab_size = 2 + len(self.words) + num_buckets

    def word_id(self, word: str) -> int:
        if word in self.ids:
            return self.ids[word]
        # crc32, not hash(): Python salts str hashes per process
        return 2 + len(self.words) + zlib.crc32(word.encode()) % self.num_buckets

    def __call__(self, prompts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
        """(B, max_tokens) ids padded with <pad>, truncated; and the bool mask of real tokens."""
        ids = torch.full((len(prompts), max_tokens), self.PAD, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            toks = [self.word_id(w) for w in re.split(r"[^a-z]+", prompt.lower()) if w] or [self.UNK]
            toks = toks[:max_tokens]
            ids[b, : len(toks)] = torch.tensor(toks)
        return ids, ids != self.PAD


def sinusoidal_positions(n: int, dim: int) -> Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs[: dim // 2])
    return pe


class TinyTextEncoder(nn.Module):
    """Word embeddings + sinusoidal positions + pre-norm transformer layers, randomly initialised
    from ``seed`` and frozen: a stand-in for a pretrained encoder in the synthetic domain."""

    def __init__(self, cfg: TextConfig, seed: int = 0, tokenizer: WordTokenizer | None = None):
        super().__init__()
        if cfg.kind != "tiny":
            raise ConfigError(f"TinyTextEncoder needs text.kind 'tiny', got {cfg.kind!r}")
        self.cfg, self.seed = cfg, seed
        self.dim, self.max_tokens = cfg.dim, cfg.max_tokens
        self.tokenizer = tokenizer or WordTokenizer()
        with torch.random.fork_rng(devices=[]):  # the same weights for a seed, whatever the global RNG
            torch.manual_seed(seed)
            self.embed = nn.Embedding(self.tokenizer.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    cfg.dim, cfg.num_heads, dim_feedforward=4 * cfg.dim, dropout=0.0,
                    activation="gelu", batch_first=True, norm_first=True,
                )
                for _ in range(cfg.num_layers)
            )
            self.norm = nn.LayerNorm(cfg.dim)
        self.register_buffer("pos", sinusoidal_positions(cfg.max_tokens, cfg.dim), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TinyTextEncoder":
        return super().train(False)  # frozen: stays in eval mode inside a model being trained

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer(prompts, self.max_tokens)
        ids, mask = ids.to(self.pos.device), mask.to(self.pos.device)
        x = self.embed(ids) + self.pos
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)
        return _zero_padding(self.norm(x), mask), mask

    def save(self, path: str | os.PathLike) -> None:
        meta = {"kind": "tiny", "config": self.cfg.model_dump(), "seed": self.seed,
                "words": self.tokenizer.words, "num_buckets": self.tokenizer.num_buckets}
        with atomic_dir(Path(path)) as tmp:
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "model.safetensors"))

    @classmethod
    def load(cls, path: str | os.PathLike, expect: TextConfig | None = None) -> "TinyTextEncoder":
        path = Path(path)
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"tiny text encoder {path}: no {name}; it is written by TinyTextEncoder.save")
        meta = json.loads((path / "config.json").read_text())
        cfg = TextConfig(**meta["config"])
        if expect is not None:
            diffs = [
                f"{k}: {path} has {getattr(cfg, k)!r}, the preset expects {getattr(expect, k)!r}"
                for k in ("kind", "max_tokens", "dim", "num_layers", "num_heads")
                if getattr(cfg, k) != getattr(expect, k)
            ]
            if diffs:
                raise ConfigError("text encoder config mismatch:\n  " + "\n  ".join(diffs))
        enc = cls(cfg, seed=meta["seed"], tokenizer=WordTokenizer(meta["words"], meta["num_buckets"]))
        enc.load_state_dict(load_file(str(path / "model.safetensors")))
        return enc


# ----------------------------------------------------------------------------- umt5


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning, minus ftfy: unescape HTML and collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class UMT5TextEncoder(nn.Module):
    """``transformers.UMT5EncoderModel`` and its tokenizer from a local directory; nothing downloads.

    ``path`` holds the model and tokenizer files together, or is a Wan diffusers root with
    ``text_encoder/`` and ``tokenizer/`` subdirectories.
    """

    def __init__(self, path: str | os.PathLike, max_tokens: int, dim: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir, tok_dir = _umt5_dirs(Path(path))
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        self.model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device)
        self.model.eval().requires_grad_(False)
        self.dim, self.max_tokens = self.model.config.d_model, max_tokens
        if dim is not None and dim != self.dim:
            raise ConfigError(
                f"UMT5 at {model_dir} has d_model {self.dim}, but text.dim is {dim}; set text.dim: {self.dim}"
            )

    def train(self, mode: bool = True) -> "UMT5TextEncoder":
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_tokens,
            truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = self.model.device
        mask = tok.attention_mask.to(device).bool()
        emb = self.model(input_ids=tok.input_ids.to(device), attention_mask=mask.long()).last_hidden_state
        return _zero_padding(emb, mask), mask


def _umt5_dirs(path: Path) -> tuple[Path, Path]:
    hint = ("put a UMT5 encoder there (config.json + model.safetensors, e.g. from "
            "Wan2.2-TI2V-5B-Diffusers/text_encoder) and its tokenizer (tokenizer.json + tokenizer_config.json), "
            "or point text.path at a Wan diffusers root holding text_encoder/ and tokenizer/")
    if not path.is_dir():
        raise FileNotFoundError(f"UMT5 directory {path} does not exist; {hint}")
    model_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append(str(model_dir / "config.json"))
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((model_dir / w).is_file() for w in weights):
        missing.append(f"{model_dir}/model.safetensors (or a sharded index)")
    if not any((tok_dir / t).is_file() for t in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
        missing.append(f"{tok_dir}/tokenizer.json (or spiece.model)")
    if missing:
        raise FileNotFoundError(f"UMT5 directory {path} is missing {', '.join(missing)}; {hint}")
    return model_dir, tok_dir


# ----------------------------------------------------------------------------- factories


def build_text_encoder(cfg: TextConfig, seed: int = 0, **umt5_kwargs) -> TextEncoder:
    """A fresh tiny encoder from ``seed``, or UMT5 from ``cfg.path``."""
    if cfg.kind == "tiny":
        return TinyTextEncoder(cfg, seed=seed)
    return load_text_encoder(cfg, **umt5_kwargs)


def load_text_encoder(cfg: TextConfig, path: str | os.PathLike | None = None, **umt5_kwargs) -> TextEncoder:
    """tiny: the encoder saved at ``path``; umt5: from ``cfg.path`` (else ``path``).

    ``umt5_kwargs`` (``dtype``, ``device``) go to :class:`UMT5TextEncoder`.
    """
    if cfg.kind == "tiny":
        if path is None:
            raise ValueError("loading a tiny text encoder needs the directory it was saved to")
        return TinyTextEncoder.load(path, expect=cfg)
    src = cfg.path or path
    if src is None:
        raise ConfigError("text.path: set it to a local UMT5 directory (umt5-xxl, as in Wan2.2); nothing downloads")
    return UMT5TextEncoder(src, cfg.max_tokens, dim=cfg.dim, **umt5_kwargs)
