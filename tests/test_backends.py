"""Model families behind one Embedder: open_clip and Hugging Face CLIP models encoded through featstore give
what each library's own code gives on the same weights and images (image embeddings, label embeddings,
zero-shot top-5), the store refuses to mix families, and openai specs keep working."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import CLASSES, draw_image, featstore
from featstore.encode import encode
from featstore.errors import FeatstoreError, ModelUnavailable
from featstore.identity import same_model
from featstore.labels import build_labels
from featstore.models import load_model
from featstore.models.open_clip import parse_spec
from featstore.query import query_split
from test_store import store_rows

TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
OPEN_CLIP_ARCH = "featstore-tiny-quickgelu"  # a real open_clip CLIP, small enough for a test
OPEN_CLIP_CONFIG = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pooled(output) -> torch.Tensor:
    """transformers 5's get_*_features return an output object; 4.x returned the tensor."""
    return getattr(output, "pooler_output", output)


def write_clip_tokenizer(folder: str):
    """A transformers CLIPTokenizer with the vocabulary clip's simple_tokenizer builds from its BPE file."""
    from clip.simple_tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              model_max_length=77)
    tokenizer.save_pretrained(folder)


class Reference:
    """A family's own reference code: raw image features of one PIL image, raw text features of prompts."""

    def __init__(self, image, texts):
        self.image, self.texts = image, texts


def open_clip_reference(checkpoint: str) -> Reference:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(OPEN_CLIP_ARCH, pretrained=checkpoint)
    model.eval()
    tokenizer = open_clip.get_tokenizer(OPEN_CLIP_ARCH)
    return Reference(lambda image: model.encode_image(preprocess(image).unsqueeze(0))[0],
                     lambda texts: model.encode_text(tokenizer(texts)))


def hf_reference(folder: str, padding: bool | str = True) -> Reference:
    """transformers' own recipe: the folder's processor, prompts padded as the model card says (SigLIP:
    padding="max_length")."""
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    return Reference(
        lambda image: pooled(model.get_image_features(**processor(images=image, return_tensors="pt")))[0],
        lambda texts: pooled(model.get_text_features(**processor(text=texts, padding=padding, return_tensors="pt"))))


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory) -> str:
    """Random weights of a registered tiny QuickGELU architecture, saved as a state dict."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    config = folder / f"{OPEN_CLIP_ARCH}.json"
    config.write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(5)
    path = str(folder / "tiny.pt")
    torch.save(open_clip.create_model(OPEN_CLIP_ARCH).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    """A random-weight transformers CLIPModel folder with its image processor and a CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = str(tmp_path_factory.mktemp("hf_clip"))
    torch.manual_seed(6)
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory) -> str:
    """A random-weight transformers SiglipModel folder with its image processor and a SentencePiece tokenizer
    trained here on the prompts' words (SigLIP's tokenizer is a SentencePiece model; none ships offline)."""
    spm = pytest.importorskip("sentencepiece", reason="SigLIP's tokenizer needs the sentencepiece package")
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer

    folder = str(tmp_path_factory.mktemp("hf_siglip"))
    corpus = [t.format(c) for t in TEMPLATES for c in CLASSES] + [" ".join(CLASSES)]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 20), model_writer=model_file, vocab_size=64,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(model_file.getvalue())
    tokenizer = SiglipTokenizer(os.path.join(folder, "spiece.model"), model_max_length=64)
    torch.manual_seed(7)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    config = SiglipConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, vocab_size=len(tokenizer), **ids),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16))
    SiglipModel(config).eval().save_pretrained(folder)
    SiglipProcessor(SiglipImageProcessor(size={"height": 64, "width": 64}), tokenizer).save_pretrained(folder)
    return folder


def encoded(root, dataset: str, spec: str) -> str:
    """The dataset's test split encoded through featstore (float32 rows), with labels and a zero-shot query."""
    store = str(root / "store")
    encode(os.path.join(dataset, "test"), store, "test", model=spec, workers=0, device="cpu", dtype="float32",
           progress=False)
    build_labels(store, templates=TEMPLATES, device="cpu")
    query_split(store, "test", top_k=5, out=str(root / "zero_shot.parquet"))
    return store


@pytest.fixture(scope="module")
def open_clip_store(tmp_path_factory, dataset, open_clip_checkpoint) -> str:
    return encoded(tmp_path_factory.mktemp("oc"), dataset, f"open_clip:{OPEN_CLIP_ARCH}:{open_clip_checkpoint}")


@pytest.fixture(scope="module")
def hf_store(tmp_path_factory, dataset, hf_folder) -> str:
    return encoded(tmp_path_factory.mktemp("hf"), dataset, f"hf:{hf_folder}")


def assert_matches_reference(store: str, dataset: str, reference: Reference) -> None:
    rows = store_rows(store, "test")
    ids = sorted(rows)
    with torch.no_grad():
        images = np.stack([reference.image(Image.open(os.path.join(dataset, "test", i))).numpy() for i in ids])
        classes = json.load(open(os.path.join(store, "featstore.json")))["classes"]
        labels = []
        for name in classes:
            prompts = unit(reference.texts([t.format(name) for t in TEMPLATES]).numpy())
            labels.append(unit(prompts.mean(axis=0)))
    labels = np.stack(labels)
    mine = np.stack([rows[i] for i in ids])
    assert len(ids) == 30 and mine.shape == images.shape
    assert (np.sum(unit(mine) * unit(images), axis=1) >= 0.9999).all()

    labels_record = json.load(open(os.path.join(store, "featstore.json")))["labels"]
    stored = pq.read_table(os.path.join(store, "labels", labels_record.get("classes_file", "classes.parquet")))
    assert stored.column("name").to_pylist() == classes
    stored_labels = np.array(stored.column("embedding").to_pylist(), np.float32)
    assert (np.sum(stored_labels * labels, axis=1) >= 0.9999).all()

    logits = 100.0 * unit(images) @ labels.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    zero_shot = pq.read_table(os.path.join(os.path.dirname(store), "zero_shot.parquet")).to_pylist()
    assert [row["id"] for row in zero_shot] == ids
    assert len({tuple(row["labels"]) for row in zero_shot}) > 1  # the rankings differ from image to image
    for row, expected, p in zip(zero_shot, top5, probs):
        assert row["labels"] == [classes[c] for c in expected]
        np.testing.assert_allclose(row["scores"], p[expected], atol=1e-4)


def test_open_clip_model_equals_open_clips_own_code(open_clip_store, open_clip_checkpoint, dataset):
    identity = json.load(open(os.path.join(open_clip_store, "featstore.json")))["model"]
    assert identity["family"] == "open_clip" and identity["architecture"] == OPEN_CLIP_ARCH
    assert identity["spec"] == f"open_clip:{OPEN_CLIP_ARCH}:{open_clip_checkpoint}" and len(identity["sha256"]) == 64
    assert_matches_reference(open_clip_store, dataset, open_clip_reference(open_clip_checkpoint))


def test_hf_clip_model_equals_transformers_own_code(hf_store, hf_folder, dataset):
    identity = json.load(open(os.path.join(hf_store, "featstore.json")))["model"]
    assert identity["family"] == "hf" and identity["spec"] == f"hf:{hf_folder}" and identity["dim"] == 32
    assert_matches_reference(hf_store, dataset, hf_reference(hf_folder))


def test_hf_siglip_model_equals_transformers_own_code(siglip_folder, tmp_path_factory, dataset):
    store = encoded(tmp_path_factory.mktemp("siglip"), dataset, f"hf:{siglip_folder}")
    identity = json.load(open(os.path.join(store, "featstore.json")))["model"]
    assert identity["family"] == "hf" and identity["architecture"].startswith("SiglipModel(") and identity["dim"] == 64
    reference = hf_reference(siglip_folder, padding="max_length")
    assert_matches_reference(store, dataset, reference)
    prompts = ["a photo of a ring.", "itap of a cross."]
    mine = unit(load_model(f"hf:{siglip_folder}", "cpu").encode_texts(prompts))
    with torch.no_grad():  # SigLIP pools the last position: prompts padded otherwise embed differently
        full, short = (unit(r.texts(prompts).numpy()) for r in (reference, hf_reference(siglip_folder)))
    assert (np.sum(mine * full, axis=1) >= 0.9999).all() and (np.sum(short * full, axis=1) < 0.99).all()


def test_open_clip_vit_b_32_checkpoint_through_the_cli(tmp_path):
    """A full-size open_clip architecture with a state dict saved the usual way, encoded by the command line."""
    import open_clip

    torch.manual_seed(8)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    model.eval()
    checkpoint = tmp_path / "vit-b-32-quickgelu.pt"
    torch.save(model.state_dict(), checkpoint)
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    (tmp_path / "images").mkdir()
    for i in range(6):
        draw_image(i, 80 + i, (60 + 30 * i, 200 - 20 * i)).save(tmp_path / "images" / f"{i}.png")
    store = str(tmp_path / "store")
    spec = f"open_clip:ViT-B-32-quickgelu:{checkpoint}"
    try:
        featstore("encode", str(tmp_path / "images"), "--store", store, "--split", "x", "--model", spec,
                  "--dtype", "float32", "--device", "cpu", "--quiet")
    finally:
        checkpoint.unlink()  # 600 MB
    identity = json.load(open(os.path.join(store, "featstore.json")))["model"]
    assert identity["family"] == "open_clip" and identity["spec"] == spec and identity["sha256"] == sha
    assert identity["architecture"] == "ViT-B-32-quickgelu" and identity["dim"] == 512
    assert not identity["random_weights"]
    rows = store_rows(store, "x")
    assert sorted(rows) == [f"{i}.png" for i in range(6)]
    with torch.no_grad():
        own = np.stack([model.encode_image(preprocess(Image.open(tmp_path / "images" / i)).unsqueeze(0))[0].numpy()
                        for i in sorted(rows)])
    assert (np.sum(unit(np.stack([rows[i] for i in sorted(rows)])) * unit(own), axis=1) >= 0.9999).all()


def test_open_clip_hf_hub_names_are_whole_model_names(monkeypatch):
    assert parse_spec("hf-hub:timm/ViT-B-16-SigLIP") == ("hf-hub:timm/ViT-B-16-SigLIP", "")
    assert parse_spec("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_spec("ViT-B-32") == ("ViT-B-32", "")
    import open_clip

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs["pretrained"]))
        raise RuntimeError("Failed initial config/weights load from HF Hub timm/ViT-B-16-SigLIP")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(ModelUnavailable, match=r"^cannot fetch open_clip hf-hub:timm/ViT-B-16-SigLIP config and "):
        load_model("open_clip:hf-hub:timm/ViT-B-16-SigLIP", "cpu")
    assert calls == [(("hf-hub:timm/ViT-B-16-SigLIP",), None)]


def test_a_store_refuses_another_family(hf_store, open_clip_store, hf_folder, dataset):
    before = {s: (open(os.path.join(s, "featstore.json")).read(), store_rows(s, "test"))
              for s in (hf_store, open_clip_store)}
    result = featstore("encode", os.path.join(dataset, "test"), "--store", hf_store, "--split", "test",
                       "--model", "random:tiny", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "holds embeddings of hf:" in result.stderr and "(openai tiny" in result.stderr
    with pytest.raises(FeatstoreError, match=r"holds embeddings of open_clip:.*\(open_clip .*would use hf:"):
        encode(os.path.join(dataset, "test"), open_clip_store, "test", model=f"hf:{hf_folder}", workers=0,
               device="cpu", progress=False)
    for store, (manifest, rows) in before.items():
        assert open(os.path.join(store, "featstore.json")).read() == manifest
        after = store_rows(store, "test")
        assert after.keys() == rows.keys() and all(np.array_equal(after[k], rows[k]) for k in rows)


def test_stores_without_a_family_are_openai():
    old = {"spec": "random:tiny:0", "sha256": None, "architecture": "tiny", "dim": 64,
           "preprocessing": "clip._transform(64)", "precision": "fp32"}
    assert same_model(old, {**old, "family": "openai"})
    assert not same_model(old, {**old, "family": "open_clip"})


def test_openai_prefix_is_the_bare_name(checkpoint):
    bare, prefixed = load_model(checkpoint, "cpu"), load_model(f"openai:{checkpoint}", "cpu")
    assert bare.identity == prefixed.identity and bare.identity["family"] == "openai"
    pixels = torch.rand(2, 3, 64, 64)
    assert torch.equal(bare.encode_images(pixels), prefixed.encode_images(pixels))
    assert np.array_equal(bare.encode_texts(["a ring"]), prefixed.encode_texts(["a ring"]))


def test_openai_preprocessing_is_clips_transform():
    from clip.clip import _transform

    from featstore.models.openai import clip_transform

    image = draw_image(3, 1, (90, 50)).convert("P")
    assert torch.equal(clip_transform(64)(image), _transform(64)(image))


def test_openai_weights_without_quickgelu_warn_before_any_weights_load(monkeypatch, capsys):
    import open_clip

    def no_network(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_network)
    with pytest.raises(ModelUnavailable, match=r"cannot fetch open_clip ViT-B-32 weights 'openai'"):
        load_model("open_clip:ViT-B-32:openai", "cpu")
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("featstore: warning: open_clip:ViT-B-32:openai")
    assert "use open_clip:ViT-B-32-quickgelu:openai" in warning[0]
    with pytest.raises(ModelUnavailable):
        load_model("open_clip:ViT-B-32-quickgelu:openai", "cpu")
    assert capsys.readouterr().err == ""  # the right architecture: no warning


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # how openai wrote its releases
def test_open_clip_refuses_torchscript_archives_in_one_line(tmp_path):
    path = str(tmp_path / "ViT-B-32.pt")  # openai's releases are TorchScript; open_clip reads state dicts only
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(FeatstoreError, match=r"is a TorchScript archive .*pass it as --model PATH"):
        load_model(f"open_clip:ViT-B-32-quickgelu:{path}", "cpu")


@pytest.mark.parametrize("spec, message", [
    ("open_clip:No-Such-Arch", "unknown open_clip architecture 'No-Such-Arch'"),
    ("open_clip:ViT-B-32:no-such-tag", "'no-such-tag' is neither a file nor a pretrained tag of open_clip ViT-B-32"),
    ("hf:/no/such/folder", "hf:/no/such/folder is neither a folder nor a model in the local Hugging Face cache"),
    ("open_clip:hf-hub:", "open_clip:hf-hub: needs a repo"),
])
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(FeatstoreError, match=message) as error:
        load_model(spec, "cpu")
    assert "\n" not in str(error.value)
