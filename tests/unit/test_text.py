"""Text encoders: the tiny built-in one, and UMT5 from a tiny checkpoint made offline in tmp_path."""

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from longlive.config import ConfigError, TextConfig, load_preset
from longlive.models.text import (
    TextEncoder,
    TinyTextEncoder,
    UMT5TextEncoder,
    WordTokenizer,
    build_text_encoder,
    load_text_encoder,
)

PROMPTS = ["A red circle moves left, then up.", "the blue square stays still", ""]


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_preset("tiny").text


def test_tokenizer():
    tok = WordTokenizer()
    ids, mask = tok(["Red CIRCLE moves-left", "zebra zebra", "", "red " * 20], max_tokens=4)
    assert ids[0].tolist() == [tok.ids["red"], tok.ids["circle"], tok.ids["moves"], tok.ids["left"]]
    assert ids[1, 0] == ids[1, 1] and ids[1, 0] >= 2 + len(tok.words)  # unknown word: a stable bucket
    assert ids[2].tolist() == [tok.UNK, tok.PAD, tok.PAD, tok.PAD]  # empty prompt: one <unk>
    assert mask.sum(1).tolist() == [4, 2, 1, 4]  # truncated to max_tokens
    assert (ids < tok.vocab_size).all()


def test_tiny_deterministic_and_distinct(tiny_cfg):
    a, b = TinyTextEncoder(tiny_cfg, seed=0), TinyTextEncoder(tiny_cfg, seed=0)
    assert isinstance(a, TextEncoder)
    assert not any(p.requires_grad for p in a.parameters())
    ea, ma = a.encode(PROMPTS)
    eb, _ = b.encode(PROMPTS)
    assert ea.shape == (3, tiny_cfg.max_tokens, tiny_cfg.dim) and ea.dtype == torch.float32
    assert torch.equal(ea, eb)
    assert not torch.allclose(ea[0], ea[1])
    ec, _ = TinyTextEncoder(tiny_cfg, seed=1).encode(PROMPTS)
    assert not torch.allclose(ea, ec)
    a.train()
    assert not a.training  # frozen stand-in for a pretrained encoder


def test_tiny_padding(tiny_cfg):
    emb, mask = build_text_encoder(tiny_cfg, seed=0).encode(PROMPTS)
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [7, 5, 1]
    assert (emb[~mask] == 0).all()
    assert (emb[mask].abs().sum(-1) > 0).all()
    # a prompt's embedding does not depend on what it is batched with
    alone, _ = build_text_encoder(tiny_cfg, seed=0).encode(PROMPTS[:1])
    torch.testing.assert_close(alone[0], emb[0], atol=1e-5, rtol=1e-5)


def test_tiny_save_load(tiny_cfg, tmp_path):
    enc = TinyTextEncoder(tiny_cfg, seed=3)
    enc.save(tmp_path / "text")
    enc.save(tmp_path / "text")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]
    loaded = load_text_encoder(tiny_cfg, tmp_path / "text")
    assert torch.equal(loaded.encode(PROMPTS)[0], enc.encode(PROMPTS)[0])
    with pytest.raises(ConfigError, match="dim: .* has 64, the preset expects 128"):
        load_text_encoder(tiny_cfg.model_copy(update={"dim": 128}), tmp_path / "text")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder(tiny_cfg, tmp_path / "nowhere")


# ----------------------------------------------------------------------------- umt5


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    """A 2-layer UMT5 and a word-level tokenizer with T5's special tokens, built without downloads."""
    path = tmp_path_factory.mktemp("umt5")
    words = sorted(set(" ".join(PROMPTS).lower().replace(",", " ").replace(".", " ").split()))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    config = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    UMT5EncoderModel(config).save_pretrained(path)
    return path


def test_umt5_matches_transformers(umt5_dir):
    enc = load_text_encoder(TextConfig(kind="umt5", max_tokens=16, dim=32, path=str(umt5_dir)))
    assert isinstance(enc, UMT5TextEncoder) and (enc.dim, enc.max_tokens) == (32, 16)
    emb, mask = enc.encode(PROMPTS)
    assert emb.shape == (3, 16, 32) and emb.dtype == torch.float32
    assert mask.sum(1).tolist() == [10, 6, 1]  # words, "," and "." (as <unk>), </s>; "" is just </s>

    tok = PreTrainedTokenizerFast.from_pretrained(umt5_dir)
    model = UMT5EncoderModel.from_pretrained(umt5_dir).eval()
    batch = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    ref = ref * batch.attention_mask[..., None]
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert (emb[~mask] == 0).all()
    assert torch.equal(mask, batch.attention_mask.bool())

    long_emb, long_mask = enc.encode(["red " * 40])  # truncated to max_tokens
    assert long_emb.shape == (1, 16, 32) and long_mask.all()


def test_umt5_wan_layout(umt5_dir, tmp_path):
    """A Wan diffusers root: the model in text_encoder/, the tokenizer in tokenizer/."""
    root = tmp_path / "wan"
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    for f in umt5_dir.iterdir():
        sub = "tokenizer" if f.name.startswith("tokenizer") else "text_encoder"
        (root / sub / f.name).write_bytes(f.read_bytes())
    enc = UMT5TextEncoder(root, max_tokens=16)
    ref = UMT5TextEncoder(umt5_dir, max_tokens=16)
    assert torch.equal(enc.encode(PROMPTS)[0], ref.encode(PROMPTS)[0])


def test_umt5_errors(umt5_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"UMT5 directory {tmp_path / 'nowhere'} does not exist"):
        load_text_encoder(TextConfig(kind="umt5", max_tokens=16, dim=32, path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is missing .*config.json.*model.safetensors.*tokenizer.json"):
        load_text_encoder(TextConfig(kind="umt5", max_tokens=16, dim=32), tmp_path / "empty")
    with pytest.raises(ConfigError, match="text.path"):
        load_text_encoder(TextConfig(kind="umt5", max_tokens=16, dim=32))
    with pytest.raises(ConfigError, match="d_model 32, but text.dim is 4096"):
        load_text_encoder(TextConfig(kind="umt5", max_tokens=16, dim=4096, path=str(umt5_dir)))
