"""Sources, models, label ensembling, queries of new images, the probe's sweep and saved classifier, jobs."""

from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, draw_image, featstore, write_cifar100, write_folder

from featstore.encode import encode
from featstore.labels import build_labels, resolve_templates
from featstore.probe import load_classifier, probe
from featstore.query import query_images, query_split
from featstore.store import Store

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip
    import torch
    from clip.clip import _transform
    from clip.model import build_model


def test_cifar_archive_source(tmp_path):
    names = write_cifar100(tmp_path / "cifar")
    store = str(tmp_path / "store")
    result = encode(f"cifar100:{tmp_path / 'cifar'}", store, "train", model="random:tiny", progress=False)
    encode(f"cifar100:{tmp_path / 'cifar'}:test", store, "holdout", model="random:tiny", progress=False)
    assert result["rows"] == 30 and result["failed"] == 0
    again = encode(f"cifar100:{tmp_path / 'cifar'}", store, "train", model="random:tiny", progress=False)
    assert (again["encoded"], again["unchanged"], again["removed"]) == (0, 30, 0)  # pixel hashes compared
    s = Store.open(store)
    assert s.classes == names  # from the archive's meta, in its order
    table = s.read_split("train")
    assert table.column("path").to_pylist()[:2] == ["train/0", "train/1"]
    labels = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    assert all(labels[f"train/{i}"] == i % 5 for i in range(30))
    assert s.summary()["splits"]["holdout"]["rows"] == 12


def test_manifest_sources_csv_and_parquet(tmp_path, dataset):
    rows = [(f"train/{c}/img_00{i}.png", c) for c in ("circle", "square") for i in range(3)]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([(os.path.join(dataset, p), c) for p, c in rows])
    pq.write_table(pa.table({"path": [p for p, _ in rows]}), os.path.join(dataset, "m.parquet"))
    store = str(tmp_path / "store")
    labelled = encode(f"manifest:{tmp_path / 'm.csv'}", store, "a", model="random:tiny", progress=False)
    unlabelled = encode(f"manifest:{os.path.join(dataset, 'm.parquet')}", store, "b", model="random:tiny", progress=False)
    assert labelled["rows"] == unlabelled["rows"] == 6
    s = Store.open(store)
    assert s.classes == ["circle", "square"]
    assert s.read_split("b").column("label").null_count == 6
    assert s.read_split("b").column("path").to_pylist()[0] == "train/circle/img_000.png"  # relative to the manifest

    # a label changed in the manifest: the row keeps its embedding and takes the new label, nothing is encoded
    before = s.read_split("a")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label")] + [(os.path.join(dataset, p), "square") for p, _ in rows])
    relabelled = encode(f"manifest:{tmp_path / 'm.csv'}", store, "a", model="random:tiny", progress=False)
    assert (relabelled["encoded"], relabelled["unchanged"], relabelled["rows"]) == (0, 3, 6)
    after = Store.open(store).read_split("a")
    assert after.column("label").to_pylist() == [1] * 6  # "square"
    assert after.drop_columns(["label"]).equals(before.drop_columns(["label"]))


def test_a_long_manifest_is_sorted_in_spilled_runs(tmp_path, monkeypatch):
    """A manifest longer than one sort run is sorted run by run, the runs spilled to unlinked temp files and
    merged: the listing is the same as one sort's, and a path listed in two runs is still refused."""
    import tempfile

    from featstore.errors import FeatstoreError
    from featstore.sources import ManifestSource

    monkeypatch.setattr(ManifestSource, "SORT_ROWS", 4)
    monkeypatch.setattr(ManifestSource, "READ_ROWS", 3)  # Parquet batches
    monkeypatch.setattr(ManifestSource, "READ_BYTES", 64)  # CSV blocks of a few rows
    spills = tmp_path / "tmp"
    spills.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spills))
    names = [f"{c}/img_{i:03d}.png" for c in ("circle", "square") for i in range(7)]
    write_folder(tmp_path, per_class=7, seed=4, classes=["circle", "square"])
    order = np.random.default_rng(0).permutation(len(names))
    rows = [(names[i], names[i].split("/")[0]) for i in order]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label")] + rows)
    pq.write_table(pa.table({"path": [p for p, _ in rows], "label": [c for _, c in rows]}), tmp_path / "m.parquet", row_group_size=2)
    for manifest in ("m.csv", "m.parquet"):
        source = ManifestSource(str(tmp_path / manifest))
        assert len(source.runs) >= 3 and not os.listdir(spills)  # all but the last spilled, names already gone
        items = list(source.iter_items())
        assert [it.id for it in items] == sorted(names) and source.classes() == ["circle", "square"]
        assert all(it.label == it.id.split("/")[0] and it.size > 0 for it in items)
    result = encode(f"manifest:{tmp_path / 'm.csv'}", str(tmp_path / "store"), "m", model="random:tiny", progress=False)
    assert result["rows"] == 14 and Store.open(str(tmp_path / "store")).read_split("m").column("id").to_pylist() == sorted(names)

    (tmp_path / "twice.csv").write_text("path\n" + "".join(f"{p}\n" for p in [names[0], *names[1:9], names[0]]))
    source = ManifestSource(str(tmp_path / "twice.csv"))  # the two lines are in different runs
    with pytest.raises(FeatstoreError, match="lists circle/img_000.png more than once"):
        list(source.iter_items())


def test_listings_walk_in_step_with_stored_rows(tmp_path, monkeypatch):
    """Encode walks a listing and the stored rows together, both in id order. Names that sort differently
    as folder entries and as paths ("a b/" < "a-b" < "a/" < "a0/") must still match row for row on a rerun,
    and a manifest in any order lists the same ids."""
    import featstore.encode.plan
    import featstore.sources.base
    import featstore.store.shards

    for module in (featstore.encode.plan, featstore.sources.base):  # listings, stored rows and the plan in batches of 3
        monkeypatch.setattr(module, "PLAN_BATCH", 3)
    monkeypatch.setattr(featstore.store.shards, "READ_ROWS", 3)
    src = tmp_path / "src"
    names = ["a/1.png", "a-b.png", "a b/2.png", "a0/3.png", "a/b/4.png", "ab.png", "\u00e9/5.png", "Z/6.png"]
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        draw_image(i, i).save(src / name)
    store = str(tmp_path / "store")
    first = encode(str(src), store, "train", model="random:tiny", progress=False)
    again = encode(str(src), store, "train", model="random:tiny", progress=False)
    assert first["encoded"] == 8 and (again["encoded"], again["unchanged"], again["removed"]) == (0, 8, 0)
    assert sorted(Store.open(store).read_split("train").column("id").to_pylist()) == sorted(names)
    (tmp_path / "m.csv").write_text("path\n" + "".join(f"src/{name}\n" for name in reversed(names)), encoding="utf-8")
    via_manifest = encode(f"manifest:{tmp_path / 'm.csv'}", store, "m", model="random:tiny", progress=False)
    assert via_manifest["encoded"] == 8
    assert Store.open(store).read_split("m").column("id").to_pylist() == sorted(f"src/{name}" for name in names)


def test_cpu_decoding_waits_while_the_model_runs(tmp_path):
    """On CPU a worker starts an item only while the runner's ModelBusy is down, waking when it drops."""
    import threading

    from featstore.encode.reader import ItemDataset, ModelBusy
    from featstore.sources import FolderSource

    draw_image(0, 0).save(tmp_path / "one.png")
    source = FolderSource(str(tmp_path))
    busy = ModelBusy()
    dataset = ItemDataset(source, list(source.iter_items()), _transform(32), model_busy=busy)
    got = []
    for _ in range(2):  # the second forward must hold the worker again
        with busy:
            reader = threading.Thread(target=lambda: got.append(dataset[0]))
            reader.start()
            reader.join(0.3)
            assert reader.is_alive() and not got  # held while the model is busy
        reader.join(10)
        assert got and got.pop()[1].shape == (3, 32, 32)
    busy.close()


def test_flat_folder_is_unlabelled_and_modes_become_rgb(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    base = draw_image(1, 1)
    base.convert("L").save(folder / "grey.png")
    base.convert("RGBA").save(folder / "alpha.png")
    base.convert("P").save(folder / "palette.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "notes.txt").write_text("not an image and not listed")
    result = encode(str(folder), str(tmp_path / "s"), "all", model="random:tiny", progress=False)
    assert result["rows"] == 4 and result["failed"] == 0
    assert Store.open(str(tmp_path / "s")).read_split("all").column("label").null_count == 4


def test_state_dict_checkpoint_matches_clip_build_model(checkpoint):
    from featstore.models import load_model

    mine = load_model(checkpoint, "cpu")
    reference = build_model(torch.load(checkpoint, weights_only=True)).float().eval()
    pixels = _transform(64)(draw_image(2, 3)).unsqueeze(0)
    with torch.no_grad():
        expected = reference.encode_image(pixels)
    # the last block computes the class token alone: the same arithmetic, so equal up to float rounding
    torch.testing.assert_close(mine.encode_images(pixels), expected, rtol=1e-5, atol=1e-6)
    # the load skips build_model's random init: every weight must still come from the checkpoint
    ours, theirs = mine.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.nn.init.normal_(torch.zeros(256)).std() > 0.5  # and torch's initialisers work again after it
    assert mine.identity["architecture"] == "tiny" and mine.identity["dim"] == 64
    assert len(mine.identity["sha256"]) == 64 and mine.identity["random_weights"] is False


def test_bf16_image_weights_are_rounded_once_as_autocast_rounds_them(checkpoint):
    from featstore.models import load_model
    from featstore.models.openai import encode_image

    fp32, bf16 = load_model(checkpoint, "cpu"), load_model(checkpoint, "cpu", "bf16")
    pixels = torch.stack([_transform(64)(draw_image(label, 5)) for label in range(3)])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = encode_image(fp32.model, pixels).float()
    assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16
    assert bf16.model.visual.ln_post.weight.dtype == torch.float32
    assert torch.equal(bf16.encode_images(pixels), expected)


def test_random_specs_are_deterministic_and_flagged():
    from featstore.models import load_model

    a, b, c = load_model("random:tiny"), load_model("random:tiny:0"), load_model("random:tiny:1")
    pixels = torch.rand(2, 3, 64, 64)
    assert torch.equal(a.encode_images(pixels), b.encode_images(pixels))
    assert not torch.equal(a.encode_images(pixels), c.encode_images(pixels))
    assert a.identity["random_weights"] is True and a.identity["spec"] == "random:tiny:0"


def test_labels_ensemble_templates_like_clip(tmp_path, dataset, checkpoint):
    store = str(tmp_path / "store")
    encode(os.path.join(dataset, "test"), store, "test", model=checkpoint, dtype="float32", progress=False)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"shape {i}" for i in range(6)) + "\n")
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    build_labels(store, templates=templates, classes_file=str(names))
    stored = pq.read_table(Store(store).label_paths()[1])  # the class table the manifest names
    model = build_model(torch.load(checkpoint, weights_only=True)).float().eval()
    with torch.no_grad():
        for c in range(6):
            text = model.encode_text(clip.tokenize([t.format(f"shape {c}") for t in templates]))
            text = text / text.norm(dim=-1, keepdim=True)
            mean = text.mean(dim=0)
            expected = (mean / mean.norm()).numpy()
            np.testing.assert_allclose(stored.column("embedding")[c].as_py(), expected, rtol=1e-5, atol=1e-6)
    assert stored.column("name").to_pylist()[0] == "circle" and stored.column("display").to_pylist()[0] == "shape 0"
    assert len(resolve_templates(templates_file="paper80")) == 80

    # a new image file is ranked exactly like the same image stored in the split
    image = os.path.join(dataset, "test", "ring", "img_001.png")
    [answer] = query_images(store, [image], top_k=3)
    out = tmp_path / "q.parquet"
    query_split(store, "test", top_k=3, out=str(out))
    rows = pq.read_table(out).to_pylist()
    stored_answer = next(r for r in rows if r["id"] == "ring/img_001.png")
    assert answer["labels"] == stored_answer["labels"]
    np.testing.assert_allclose(answer["scores"], stored_answer["scores"], rtol=1e-4)
    assert answer["scores"] == sorted(answer["scores"], reverse=True)


def test_query_image_cli_prints_json(tmp_path, dataset):
    store = str(tmp_path / "store")
    encode(os.path.join(dataset, "test"), store, "test", model="random:tiny", progress=False)
    featstore("labels", store)
    image = os.path.join(dataset, "test", "circle", "img_000.png")
    answer = json.loads(featstore("query", store, "--image", image, "--image", image, "--top-k", "2", "--json").stdout)
    assert [a["image"] for a in answer] == [image, image]
    assert len(answer[0]["labels"]) == 2 and answer[0]["scores"][0] >= answer[0]["scores"][1]


def test_probe_sweep_and_saved_classifier(tmp_path, dataset, checkpoint):
    from sklearn.linear_model import LogisticRegression

    store = str(tmp_path / "store")
    for split in ("train", "test"):
        encode(os.path.join(dataset, split), store, split, model=checkpoint, dtype="float32", progress=False)
    result = probe(store, "train", "test", out=str(tmp_path / "probe"))
    assert result["C"] in [float(c) for c in result["sweep"]] or f"{result['C']:g}" in result["sweep"]
    assert len(result["sweep"]) >= 5 and result["solver"] == "torch"
    arrays, meta = load_classifier(str(tmp_path / "probe.npz"))
    s = Store.open(store)
    _, x_train, y_train = s.features("train")
    _, x_test, y_test = s.features("test")
    expected = LogisticRegression(random_state=0, C=result["C"], max_iter=1000).fit(x_train, y_train)
    predictions = arrays["classes"][np.argmax(x_test @ arrays["coef"].T + arrays["intercept"], axis=1)]
    np.testing.assert_array_equal(predictions, expected.predict(x_test))
    assert result["acc1"] == pytest.approx(float((predictions == y_test).mean()))
    assert meta["classes"] == s.classes and meta["model"]["sha256"] == s.manifest.model["sha256"]


def test_demo_job_runs_offline(tmp_path):
    job = tmp_path / "demo.toml"
    text = open(os.path.join(REPO, "jobs", "demo.toml")).read()
    job.write_text(text.replace('"../data/', f'"{REPO}/data/').replace('"../stores/demo"', '"store"')
                   .replace('"../stores/', '"'))  # reports under tmp_path
    result = featstore("run", str(job), "--json", env={"HOME": str(tmp_path)})
    results = json.loads(result.stdout)
    assert "RANDOM WEIGHTS" in result.stderr and "ViT-B-32.pt" in result.stderr
    assert results["encode"]["train"]["rows"] == 64 and results["encode"]["test"]["rows"] == 32
    assert results["query"]["n"] == 32 and 0 <= results["query"]["acc1"] <= 1
    assert results["probe"]["n_test"] == 32 and results["probe"]["acc1"] > 0.5
    assert results["index"]["rows"] == 64 and results["index"]["kind"] == "Flat"  # the train split's image index
    leaks = pq.read_table(tmp_path / "reports/demo/leaks.parquet")  # test rows near train rows
    assert leaks.num_rows == results["dedup"]["pairs"] and leaks.column_names == ["id_a", "id_b", "score"]
    assert (tmp_path / "reports/demo/index.html").is_file()


def test_manifest_ids_are_paths_relative_to_the_manifest(tmp_path):
    """A relative path's id is the path from the manifest's folder, normalised (what os.path.relpath gives),
    including paths that climb out of the folder; absolute paths outside it are normalised the same way."""
    from featstore.sources import ManifestSource

    root = tmp_path / "data"
    root.mkdir()
    (root / "m.csv").write_text("path\nx.png\n")
    source = ManifestSource(str(root / "m.csv"))
    paths = ["a/./b.png", "a//b.png", "./a.png", "a/../b.png", "a/b/", "..foo/a.png", "../x/a.png",
             "a/../../x.png", f"../{root.name}/y.png", "..", ".", ""]
    for path in paths:
        assert source._id(path) == os.path.relpath(os.path.join(str(root), path), str(root)), path
    assert source._id("/abs//p.png") == "/abs/p.png"  # normalised like relative ones (test_hardening_sources)
