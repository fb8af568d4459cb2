"""Prompt corpora (``dmd.prompts``): reading them (local and S3), the training captions encode writes as one,
embeddings computed once, and DMD drawing from a corpus -- the training captions as a corpus draw exactly what
the captions of the shards draw (same losses, same weights), and a prompt only in a corpus reaches a rollout."""

import json

import pytest
import torch

from longlive.data.prompts import PromptError, embed_prompts, read_corpus, training_prompts, write_corpus
from longlive.data.shards import read_manifest
from longlive.data.synth import read_index
from longlive.train.ar import ShardClips

ONLY_IN_CORPUS = "a glass unicorn dances under a purple moon"


def test_txt_and_jsonl_corpora(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle moves left\n\n  a blue square bounces  \n")
    c = read_corpus(str(tmp_path / "p.txt"))
    assert c.prompts == ("a red circle moves left", "a blue square bounces") and c.clips == (None, None)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "clip": "000003"}\n')
    c = read_corpus(str(tmp_path / "p.jsonl"))
    assert c.prompts == ("a cat", "a dog") and c.clips == (None, "000003") and len(c) == 2
    assert c.sha256 != read_corpus(str(tmp_path / "p.txt")).sha256


@pytest.mark.parametrize("name,content,message", [
    ("p.csv", b"a,b\n", "is .txt .* or .jsonl"),
    ("missing.txt", None, "is not a file"),
    ("latin1.txt", "un caf\xe9".encode("latin-1"), "not UTF-8 .*save it as UTF-8"),
    ("empty.txt", b"\n\n", "holds no prompt"),
    ("bad.jsonl", b'{"prompt": "ok"}\nnot json\n', "line 2 is not JSON"),
    ("noprompt.jsonl", b'{"caption": "x"}\n', "line 1 has no \"prompt\""),
    ("badclip.jsonl", b'{"prompt": "x", "clip": 3}\n', "\"clip\" must be a clip key"),
])
def test_bad_corpora_are_one_line_naming_the_fix(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(PromptError, match=message) as e:
        read_corpus(str(tmp_path / name))
    assert "\n" not in str(e.value)


def test_corpus_on_s3(s3_bucket):
    import fsspec

    with fsspec.open(f"{s3_bucket}/prompts/p.txt", "w") as f:
        f.write("a green triangle spins\n")
    assert read_corpus(f"{s3_bucket}/prompts/p.txt").prompts == ("a green triangle spins",)


def test_embeddings_are_computed_once_and_cached(tmp_path):
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return torch.stack([torch.full((3, 4), float(len(p))) for p in prompts])

    prompts = ["a", "bb", "a", "ccc"]
    first = embed_prompts(prompts, encode, tmp_path, "enc-1", batch_size=2)
    assert calls == [["a", "bb"], ["ccc"]], "each distinct prompt once"
    assert set(first) == {"a", "bb", "ccc"} and first["ccc"].dtype == torch.float16 and first["ccc"][0, 0] == 3
    again = embed_prompts(prompts, encode, tmp_path, "enc-1")
    assert len(calls) == 2 and all(torch.equal(again[p], first[p]) for p in first), "read from the cache"
    embed_prompts(prompts, encode, tmp_path, "enc-2")  # another encoder: its own embeddings
    assert len(calls) == 3 and calls[-1] == ["a", "bb", "ccc"]


# --------------------------------------------------------------------------- DMD draws from the corpus

@pytest.fixture(scope="module")
def shards(synth_dir, fake_encoders, tmp_path_factory):
    from longlive.data.encode import encode_dataset

    url = str(tmp_path_factory.mktemp("prompts") / "shards")
    encode_video, encode_text = fake_encoders
    encode_dataset(synth_dir, url, encode_video=encode_video, encode_text=encode_text, samples_per_shard=5)
    return url


@pytest.fixture(scope="module")
def record(shards, tiny_preset, tmp_path_factory):
    from conftest import validate_into

    return validate_into(shards, tiny_preset, tmp_path_factory.mktemp("prompts_validate"))


@pytest.fixture(scope="module")
def training_corpus(shards, synth_dir, tmp_path_factory):
    """What the encode stage writes: data/encoded/prompts.jsonl."""
    path = tmp_path_factory.mktemp("corpus") / "prompts.jsonl"
    write_corpus(path, training_prompts(read_manifest(shards), read_index(synth_dir)))
    return path


def test_the_training_corpus_is_the_first_captions_in_the_trainers_order(shards, record, synth_dir, training_corpus):
    corpus = read_corpus(str(training_corpus))
    data = ShardClips(shards, validation_report=record)
    assert list(corpus.clips) == [c.key for c in data._all]
    first = {r["key"]: r["captions"][0] for r in read_index(synth_dir)}
    assert list(corpus.prompts) == [first[c.key] for c in data._all]
    assert any(len(r["captions"]) > 1 for r in read_index(synth_dir)), "multi-shot clips contribute their first shot"


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("image", [False, True])
def test_the_training_corpus_draws_what_the_shards_captions_draw(shards, record, training_corpus, streaming, image):
    from longlive.train.dmd import PromptDraw, first_shot_batch

    data = ShardClips(shards, 1 if streaming else None, validation_report=record)
    old, new = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draw = PromptDraw(data, read_corpus(str(training_corpus)), image=image)
    if not streaming:
        assert draw.to_embed() == [], "every prompt is a stored caption: nothing to embed again"
    else:
        draw.embeddings = {}  # streamed shards: a prompt matching its clip still takes the stored embedding
    for _ in range(5):
        if streaming:  # the draw differs (lines, not shards, are drawn uniformly); the pairing holds
            clips, context = draw(3, new)
            torch.testing.assert_close(context, first_shot_batch(clips)[1], rtol=0, atol=0)
            continue
        clips = data.sample(3, old)
        got, context = draw(3, new)
        assert [c.key for c in got] == [c.key for c in clips]
        assert torch.equal(context, first_shot_batch(clips)[1])
    if not streaming:
        assert torch.equal(old.get_state(), new.get_state()), "the generator is consumed alike"


def _dmd_setup(preset, shards, record, tmp_path, variant, prompts):
    from longlive.config import DMDConfig
    from longlive.models.dit import WanDiT
    from longlive.models.text import TinyTextEncoder
    from longlive.models.wan_adapter import save_dit
    from longlive.models.checkpoint import AR_CONFIG_NAME
    from longlive.train.ar import inference_config

    dmd_cfg = preset.dmd.model_copy(update={
        "train": preset.dmd.train.model_copy(update={"steps": 3, "batch_size": 2, "log_every": 1}),
        "critic_updates": 2, "ckpt_every": 10, "prompts": prompts})
    preset = preset.model_copy(update={"dmd": DMDConfig.model_validate(dmd_cfg.model_dump())})
    base, ar_dir = tmp_path.parent / "base", tmp_path.parent / f"ar-{variant}"
    if not (ar_dir / "dit").is_dir():  # random models, the same for every run of a test
        torch.manual_seed(0)
        dit = WanDiT(preset.dit, in_channels=preset.vae.z_dim, text_dim=preset.text.dim)
        dit.init_weights(0)
        with torch.no_grad():  # a non-zero head, so the generator's output depends on its prompt
            torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
        save_dit(dit, base / "dit")
        TinyTextEncoder(preset.text, seed=0).save(base / "text")
        save_dit(dit, ar_dir / "dit")
        (ar_dir / AR_CONFIG_NAME).write_text(json.dumps(inference_config(preset, variant)))
    return preset, dict(ar_dir=ar_dir, base_dir=base, work_dir=tmp_path / "work", plots_dir=tmp_path / "plots",
                        out_dir=tmp_path / "out", shards_url=shards, validation_report=record,
                        prompt_cache=tmp_path.parent / "prompt-cache")


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_dmd_on_the_training_corpus_equals_dmd_on_the_shards_captions(tiny_preset, shards, record, training_corpus,
                                                                       tmp_path, monkeypatch, variant):
    """The tiny preset's dmd.prompts (data/encoded/prompts.jsonl) changes no bit of what train_dmd computes."""
    from longlive.train.dmd import train_dmd

    monkeypatch.setenv("WANDB_MODE", "disabled")
    runs = {}
    for name, prompts in (("captions", None), ("corpus", str(training_corpus))):
        preset, kw = _dmd_setup(tiny_preset, shards, record, tmp_path / name, variant, prompts)
        assert preset.dmd.tf_weight > 0, "the data term's clips are compared too"
        train_dmd(preset, variant, "2step", **kw)
        runs[name] = kw
    for plot in ("critic_loss.json", "dmd_grad.json"):
        a, b = ((runs[n]["plots_dir"] / plot).read_text() for n in ("captions", "corpus"))
        assert a == b and len(json.loads(a)) > 0, plot
    for f in ("dit/diffusion_pytorch_model.safetensors", "critic/diffusion_pytorch_model.safetensors"):
        a, b = ((runs[n]["out_dir"] / f).read_bytes() for n in ("captions", "corpus"))
        assert a == b, f


def test_a_prompt_only_in_the_corpus_reaches_a_rollout(tiny_preset, shards, record, synth_dir, tmp_path, monkeypatch):
    from longlive.models.text import TinyTextEncoder
    from longlive.train import dmd as dmd_train

    assert all(ONLY_IN_CORPUS not in r["captions"] for r in read_index(synth_dir))
    (tmp_path / "prompts.txt").write_text(ONLY_IN_CORPUS + "\n")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    preset, kw = _dmd_setup(tiny_preset, shards, record, tmp_path / "run", "t2v", str(tmp_path / "prompts.txt"))
    seen = []
    rollout = dmd_train.dmd.rollout

    def spy(model, shape, context, *a, **k):
        seen.append(context.detach().clone())
        return rollout(model, shape, context, *a, **k)

    monkeypatch.setattr(dmd_train.dmd, "rollout", spy)
    dmd_train.train_dmd(preset, "t2v", "2step", **kw)
    expected = TinyTextEncoder.load(kw["base_dir"] / "text").encode([ONLY_IN_CORPUS])[0][0].half().float()
    assert len(seen) == preset.dmd.train.steps
    for context in seen:
        assert context.shape[0] == 2 and all(torch.equal(c, expected) for c in context)
    assert len(list(kw["prompt_cache"].glob("*.safetensors"))) == 1, "embedded once, cached"


def test_i2v_draws_only_prompts_with_their_clip(shards, record, training_corpus, tmp_path):
    from longlive.train.dmd import PromptDraw

    data = ShardClips(shards, validation_report=record)
    (tmp_path / "plain.txt").write_text(ONLY_IN_CORPUS + "\n")
    plain = read_corpus(str(tmp_path / "plain.txt"))
    assert PromptDraw(data, plain, image=True).lines is None, "a plain prompt list: I2V keeps the training clips"
    assert PromptDraw(data, plain, image=False).to_embed() == [ONLY_IN_CORPUS]
    lines = [json.loads(x) for x in training_corpus.read_text().splitlines()]
    mixed = tmp_path / "mixed.jsonl"
    write_corpus(mixed, lines[:2] + [{"prompt": ONLY_IN_CORPUS}])
    draw = PromptDraw(data, read_corpus(str(mixed)), image=True)
    assert draw.lines == [0, 1]
    clips, _ = draw(8, torch.Generator().manual_seed(0))
    assert {c.key for c in clips} <= {lines[0]["clip"], lines[1]["clip"]}
    write_corpus(tmp_path / "gone.jsonl", [{"prompt": "x", "clip": "no-such-clip"}])
    with pytest.raises(PromptError, match="names clip 'no-such-clip' .*dvc repro encode"):
        PromptDraw(data, read_corpus(str(tmp_path / "gone.jsonl")))
