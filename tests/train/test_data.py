"""Data pipeline: sources, transform, global batch sampler, bad-record fallback, determinism, webdataset."""

from __future__ import annotations

import csv
import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bksdm.seeding import STREAM_DATA, mix_seed, sample_generator
from bksdm.train.data import (
    MAX_CONSECUTIVE_BAD,
    BadRecordError,
    DataError,
    DistillDataset,
    FolderSource,
    GlobalBatchSampler,
    HFSource,
    ImageTransform,
    SampleRef,
    UnusableDataError,
    WebDatasetSource,
    clean_caption,
    collate,
    open_image,
    open_source,
)

R = 32  # output resolution of the tests
QUOTED = 'a "quoted" caption, with commas,\nand a newline'


def two_tone(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: a horizontal flip is visible."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2, 0] = 255
    array[:, width // 2 :, 2] = 255
    return Image.fromarray(array)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# One row per record of the folder fixture: (file name, caption, what the file is).
ROWS = [
    ("rgb.jpg", "a red and blue square", "good"),
    ("truncated.jpg", "cut short", "bad: truncated JPEG"),
    ("notimage.jpg", "text in disguise", "bad: not an image"),
    ("missing.jpg", "never written", "bad: missing file"),
    ("rgba.png", "", "bad: empty caption"),
    ("gray.png", QUOTED, "good"),
    ("palette.png", "palette", "good"),
    ("gray16.png", "sixteen bits", "good"),
    ("tiny.png", "tiny", "good"),
    ("wide.jpg", "wide", "good"),
    ("rgba.png", "transparent", "good"),
    ("rgb.jpg", "  padded caption \n", "good"),
]
BAD = [i for i, row in enumerate(ROWS) if row[2].startswith("bad")]


def write_images(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    jpeg = encode(two_tone(96, 64), "JPEG")
    (root / "rgb.jpg").write_bytes(jpeg)
    (root / "truncated.jpg").write_bytes(encode(two_tone(256, 256), "JPEG")[:700])
    (root / "notimage.jpg").write_text("this is not an image")
    rgba = np.zeros((40, 30, 4), dtype=np.uint8)  # fully transparent black: white once composited
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.new("L", (50, 70), 64).save(root / "gray.png")
    Image.new("RGB", (40, 40), (0, 255, 0)).convert("P").save(root / "palette.png")
    Image.fromarray(np.full((30, 45), 128 * 257, dtype=np.uint16)).save(root / "gray16.png")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(root / "tiny.png")
    two_tone(6000, 300).save(root / "wide.jpg")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of odd images with a metadata.csv (see ROWS)."""
    root = tmp_path_factory.mktemp("folder")
    write_images(root)
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(row[:2] for row in ROWS)
    return root


@pytest.fixture(scope="module")
def dataset(folder: Path) -> DistillDataset:
    return DistillDataset(FolderSource(folder), ImageTransform(R, center_crop=False), seed=1234)


def load(dataset: DistillDataset, index: int, step: int = 0, position: int = 0) -> dict:
    return dataset[SampleRef(index, step, position)]


# ---------------------------------------------------------------------------------------------------------
# Transform


@pytest.mark.parametrize(
    ("name", "expected_rgb"),
    [
        ("rgba.png", (255, 255, 255)),  # transparent -> white
        ("gray.png", (64, 64, 64)),
        ("palette.png", (0, 255, 0)),
        ("gray16.png", (128, 128, 128)),  # scaled from 16 bits, not clipped at 255
        ("tiny.png", (0, 0, 255)),  # 4x4, upscaled
    ],
)
def test_transform_converts_modes_to_rgb_in_range(folder: Path, name: str, expected_rgb: tuple) -> None:
    out = ImageTransform(R)(open_image(folder / name), torch.Generator().manual_seed(0))
    assert out.pixel_values.shape == (3, R, R) and out.pixel_values.dtype == torch.float32
    expected = torch.tensor(expected_rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    torch.testing.assert_close(out.pixel_values, expected.expand(3, R, R), atol=1 / 127.5, rtol=0)


def test_transform_flip_and_crop_come_from_the_generator(folder: Path) -> None:
    transform = ImageTransform(R, center_crop=False, random_flip=True)
    outs = [transform(open_image(folder / "wide.jpg"), torch.Generator().manual_seed(s)) for s in range(16)]
    for out in outs:
        assert out.pixel_values.shape == (3, R, R)
        assert out.pixel_values.min() >= -1 and out.pixel_values.max() <= 1
        assert out.original_size == (300, 6000)
        top, left = out.crop_top_left
        assert top == 0 and 0 <= left <= R * 6000 // 300 - R
    assert {o.flipped for o in outs} == {True, False}
    assert len({o.crop_top_left for o in outs}) > 4
    again = transform(open_image(folder / "wide.jpg"), torch.Generator().manual_seed(3))
    assert torch.equal(again.pixel_values, outs[3].pixel_values) and again.crop_top_left == outs[3].crop_top_left

    # The two-tone image shows the flip: red on the left unless flipped.
    center = ImageTransform(R, center_crop=True, random_flip=True)
    for seed in range(8):
        out = center(open_image(folder / "rgb.jpg"), torch.Generator().manual_seed(seed))
        left_red = out.pixel_values[0, :, : R // 4].mean() > 0.5
        assert left_red == (not out.flipped)
        assert out.crop_top_left == (0, (R * 96 // 64 - R) // 2)
        assert out.flipped == bool(torch.rand((), generator=torch.Generator().manual_seed(seed)) < 0.5)


def test_transform_matches_a_full_resize_then_crop() -> None:
    """The memory-saving path (JPEG draft, crop window, box resize) is a plain resize + crop, up to rounding."""
    rng = np.random.default_rng(0)
    array = (np.linspace(0, 255, 1200)[None, :, None] + rng.normal(0, 10, (800, 1200, 3))).clip(0, 255)
    data = encode(Image.fromarray(array.astype(np.uint8)), "JPEG")
    out = ImageTransform(R, center_crop=False, random_flip=False)(open_image(data), torch.Generator().manual_seed(1))
    top, left = out.crop_top_left
    naive = Image.open(io.BytesIO(data)).convert("RGB").resize((48, 32), Image.Resampling.BICUBIC)
    naive = torch.from_numpy(np.array(naive.crop((left, top, left + R, top + R)))).permute(2, 0, 1) / 127.5 - 1
    assert (naive - out.pixel_values).abs().mean() < 0.03


def test_decompression_bomb_is_skipped_not_fatal(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000 * 300 - 1)
    with pytest.raises(BadRecordError, match="decompression-bomb"):
        open_image(folder / "wide.jpg")
    dataset = DistillDataset(FolderSource(folder), ImageTransform(R), seed=0)
    sample = load(dataset, ROWS.index(("wide.jpg", "wide", "good")))
    assert sample["caption"] == "transparent"  # the next record
    assert len(sample["skipped"]) == 1 and "wide.jpg" in sample["skipped"][0]


def test_clean_caption() -> None:
    assert clean_caption("  a cat \n") == ["a cat"]
    assert clean_caption(b"caf\xc3\xa9") == ["café"]
    assert clean_caption(["", "one", " two "]) == ["one", "two"]
    for bad, reason in [
        (None, "no caption"),
        ("  ", "empty"),
        (3.5, "float"),
        (b"\xff\xfe", "UTF-8"),
        ([], "empty caption list"),
    ]:
        with pytest.raises(BadRecordError, match=reason):
            clean_caption(bad)


# ---------------------------------------------------------------------------------------------------------
# Sources


def test_folder_source_reads_csv_with_quotes_commas_newlines(folder: Path) -> None:
    source = FolderSource(folder)
    assert len(source) == len(ROWS)
    image, caption, record_id = source[5]
    assert caption == QUOTED and Path(image) == folder / "gray.png" and record_id.endswith("gray.png")


def test_folder_source_jsonl(tmp_path: Path, folder: Path) -> None:
    lines = [
        json.dumps({"file_name": str(folder / "rgb.jpg"), "text": ["first caption", "second caption"]}),
        json.dumps({"file_name": str(folder / "gray.png"), "text": QUOTED, "extra": 1}),
        "",
        json.dumps({"file_name": str(folder / "tiny.png"), "text": None}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    source = open_source(tmp_path)  # a malformed line is an error: tests/test_faults_data.py
    assert isinstance(source, FolderSource) and len(source) == 3
    assert source[1][1] == QUOTED

    dataset = DistillDataset(source, ImageTransform(R), seed=7)
    chosen = [load(dataset, 0, step=s)["caption"] for s in range(20)]
    assert set(chosen) == {"first caption", "second caption"}  # one caption per step, drawn from the slot
    assert chosen == [load(dataset, 0, step=s)["caption"] for s in range(20)]
    sample = load(dataset, 2)  # None caption -> wraps around to record 0
    assert sample["index"] == 0 and "no caption" in sample["skipped"][0]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_missing_columns_error_names_them(tmp_path: Path, fmt: str) -> None:
    if fmt == "csv":
        (tmp_path / "metadata.csv").write_text("file,caption\na.jpg,hi\n")
    else:
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"file": "a.jpg", "caption": "hi"}) + "\n")
    with pytest.raises(ValueError, match=rf"metadata\.{fmt}") as info:
        FolderSource(tmp_path)
    message = str(info.value)
    assert "'file_name'" in message and "'text'" in message and "['caption', 'file']" in message
    source = FolderSource(tmp_path, image_column="file", caption_column="caption")
    assert source[0][1] == "hi"


def test_optional_packages_missing_give_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        HFSource("anything")
    with pytest.raises(ImportError, match="pip install webdataset"):
        WebDatasetSource("shards-{0..3}.tar", ImageTransform(R), seed=0, batch_size=1)


def test_open_source_rejects_unknown_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="WebDatasetSource"):
        open_source(str(tmp_path / "shards-{0..3}.tar"))
    with pytest.raises(DataError, match="has no metadata.csv or metadata.jsonl"):
        open_source(tmp_path)


def test_hf_source_from_save_to_disk(tmp_path: Path, folder: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {
        "image": [{"bytes": (folder / n).read_bytes(), "path": None} for n in ("rgb.jpg", "notimage.jpg", "gray.png")],
        "text": ["hf one", "hf broken", "hf three"],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))

    source = open_source(f"hf:{tmp_path / 'hf'}")
    assert isinstance(source, HFSource) and len(source) == 3
    assert isinstance(source[0][0], bytes) and source[2][1] == "hf three"
    dataset = DistillDataset(source, ImageTransform(R), seed=0)
    sample = load(dataset, 1)
    assert sample["caption"] == "hf three" and sample["index"] == 2 and "[1]" in sample["skipped"][0]
    with pytest.raises(ValueError, match=r"'caption'.*columns present: \['image', 'text'\]"):
        HFSource(tmp_path / "hf", caption_column="caption")


def test_hf_source_imagefolder(tmp_path: Path, folder: Path) -> None:
    pytest.importorskip("datasets")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("rgb.jpg", "tiny.png"):
        (images / name).write_bytes((folder / name).read_bytes())
    (images / "metadata.csv").write_text("file_name,text\nrgb.jpg,first\ntiny.png,second\n")
    source = HFSource(images, cache_dir=str(tmp_path / "cache"))
    sample = DistillDataset(source, ImageTransform(R), seed=0)[SampleRef(1, 0, 0)]
    assert sample["caption"] == "second" and sample["pixel_values"].shape == (3, R, R)


# ---------------------------------------------------------------------------------------------------------
# Bad records


def test_bad_records_fall_back_deterministically(dataset: DistillDataset) -> None:
    sample = load(dataset, 1, step=3, position=2)
    assert sample["index"] == 5 and sample["caption"] == QUOTED
    reasons = sample["skipped"]
    assert len(reasons) == 4
    assert "truncated.jpg" in reasons[0] and "OSError" in reasons[0]
    assert "notimage.jpg" in reasons[1] and "not an image" in reasons[1]
    assert "missing.jpg" in reasons[2] and "FileNotFoundError" in reasons[2]
    assert "rgba.png" in reasons[3] and "empty caption" in reasons[3]
    again = load(dataset, 1, step=3, position=2)
    assert torch.equal(again["pixel_values"], sample["pixel_values"]) and again["skipped"] == reasons
    # The replacement is transformed with its slot's generator: like loading index 5 in that slot directly.
    direct = load(dataset, 5, step=3, position=2)
    assert torch.equal(direct["pixel_values"], sample["pixel_values"]) and direct["skipped"] == []
    assert load(dataset, 11)["caption"] == "padded caption"
    first_two = DistillDataset(dataset.source, dataset.transform, dataset.seed, max_samples=2)
    assert len(first_two) == 2 and load(first_two, 1)["index"] == 0  # the fallback wraps within the subset


def test_every_good_record_loads(dataset: DistillDataset) -> None:
    for index in range(len(ROWS)):
        sample = load(dataset, index, step=index)
        assert sample["pixel_values"].shape == (3, R, R)
        assert -1 <= sample["pixel_values"].min() <= sample["pixel_values"].max() <= 1
        assert (sample["index"] == index) == (index not in BAD)


class AllBad:
    """A source whose every record lacks an image."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple:
        return None, "caption", f"record {index}"


@pytest.mark.parametrize("n", [3, 150])
def test_unusable_data_raises(n: int) -> None:
    dataset = DistillDataset(AllBad(n), ImageTransform(R), seed=0)
    expected = "all 3 records of the data" if n == 3 else f"{MAX_CONSECUTIVE_BAD} consecutive records from index 1"
    with pytest.raises(UnusableDataError, match=f"{expected} are unusable"):
        dataset[SampleRef(1, 0, 0)]


def test_dataset_wants_sample_refs(dataset: DistillDataset) -> None:
    with pytest.raises(TypeError, match="SampleRef"):
        dataset[0]


# ---------------------------------------------------------------------------------------------------------
# Sampler


def test_sampler_order_is_a_seeded_permutation_per_epoch() -> None:
    sampler = GlobalBatchSampler(10, 4, seed=5)
    assert sampler.steps_per_epoch == 2 and [sampler.epoch_of(s) for s in range(5)] == [0, 0, 1, 1, 2]
    for epoch in range(3):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(mix_seed(5, epoch))).tolist()
        # The last 2 of each epoch's 10 are dropped: no batch spans two epochs.
        assert sampler.global_indices(2 * epoch) + sampler.global_indices(2 * epoch + 1) == order[:8]
    padded = GlobalBatchSampler(10, 4, seed=5, drop_last=False)
    order = padded.epoch_order(0).tolist()
    assert padded.steps_per_epoch == 3 and padded.global_indices(2) == order[8:] + order[:2]
    assert padded.epoch_of(3) == 1


def test_sampler_is_independent_of_world_size_and_resume() -> None:
    single = GlobalBatchSampler(50, 8, seed=1, max_steps=20)
    batches = list(single)
    assert len(batches) == len(single) == 20
    for step, batch in enumerate(batches):
        assert [ref.step for ref in batch] == [step] * 8 and [ref.position for ref in batch] == list(range(8))
    for world_size in (2, 4):
        ranks = [list(GlobalBatchSampler(50, 8, 1, r, world_size, max_steps=20)) for r in range(world_size)]
        for step in range(20):
            assert [ref for rank in ranks for ref in rank[step]] == batches[step]
    resumed = GlobalBatchSampler(50, 8, seed=1, start_step=13, max_steps=20)
    assert list(resumed) == batches[13:]
    assert [b for b, _ in zip(GlobalBatchSampler(50, 8, seed=1), range(25), strict=False)][:20] == batches


def test_sampler_rejects_uneven_split_and_tiny_data() -> None:
    with pytest.raises(ValueError, match="does not split evenly over 3 processes.*multiple of 3"):
        GlobalBatchSampler(100, 8, seed=0, world_size=3)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GlobalBatchSampler(5, 8, seed=0)
    with pytest.raises(TypeError, match="infinite"):
        len(GlobalBatchSampler(100, 8, seed=0))


# ---------------------------------------------------------------------------------------------------------
# Determinism across processes and workers


def run_loader(dataset: DistillDataset, world_size: int, num_workers: int, steps: int = 3, start: int = 0) -> list:
    """Batches of every rank, merged per step in rank order (as if the processes' shares were gathered)."""
    per_rank = []
    for rank in range(world_size):
        sampler = GlobalBatchSampler(len(dataset), 4, 99, rank, world_size, start_step=start, max_steps=start + steps)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
        per_rank.append(list(loader))
    return [collate_gathered([r[i] for r in per_rank]) for i in range(steps)]


def collate_gathered(batches: list[dict]) -> dict:
    return {
        "pixel_values": torch.cat([b["pixel_values"] for b in batches]),
        "caption": [c for b in batches for c in b["caption"]],
        "index": torch.cat([b["index"] for b in batches]),
        "position": torch.cat([b["position"] for b in batches]),
        "flipped": torch.cat([b["flipped"] for b in batches]),
        "skipped": [s for b in batches for s in b["skipped"]],
    }


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert x["caption"] == y["caption"] and x["skipped"] == y["skipped"]
        for key in ("index", "position", "flipped"):
            assert torch.equal(x[key], y[key])


def test_samples_do_not_depend_on_processes_workers_or_resume(dataset: DistillDataset) -> None:
    reference = run_loader(dataset, world_size=1, num_workers=0, steps=4)
    assert reference[0]["pixel_values"].shape == (4, 3, R, R)
    assert reference[0]["position"].tolist() == [0, 1, 2, 3]
    assert sum(len(b["skipped"]) for b in reference) > 0  # the bad records were met and replaced
    assert len({bool(f) for b in reference for f in b["flipped"]}) == 2
    for step, batch in enumerate(reference):  # flips come from the slot's generator, drawn first
        slots = [sample_generator(1234, step, p, STREAM_DATA) for p in range(4)]
        assert batch["flipped"].tolist() == [bool(torch.rand((), generator=g) < 0.5) for g in slots]
    assert_same_batches(run_loader(dataset, world_size=2, num_workers=0, steps=4), reference)
    assert_same_batches(run_loader(dataset, world_size=2, num_workers=2, steps=4), reference)
    assert_same_batches(run_loader(dataset, world_size=1, num_workers=0, steps=2, start=2), reference[2:])


def test_dataset_pickles_for_spawned_workers(dataset: DistillDataset) -> None:
    clone = pickle.loads(pickle.dumps(dataset))
    ref = SampleRef(6, 1, 1)
    assert torch.equal(clone[ref]["pixel_values"], dataset[ref]["pixel_values"])
    sampler = GlobalBatchSampler(len(dataset), 2, 99, max_steps=1)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=1, multiprocessing_context="spawn"
    )
    (batch,) = list(loader)
    assert torch.equal(batch["pixel_values"][0], dataset[sampler.batch(0)[0]]["pixel_values"])


# ---------------------------------------------------------------------------------------------------------
# Webdataset shards

NUM_SHARDS, PER_SHARD = 4, 3
CORRUPT_KEY = "s001"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 shards x 3 samples; sample s001 has a corrupt image; captions as txt, caption or json."""
    webdataset = pytest.importorskip("webdataset")
    root = tmp_path_factory.mktemp("shards")
    for shard in range(NUM_SHARDS):
        with webdataset.TarWriter(str(root / f"{shard:05d}.tar")) as writer:
            for i in range(PER_SHARD):
                n = shard * PER_SHARD + i
                key = f"s{n:03d}"
                image = (
                    b"\xff\xd8 broken"
                    if key == CORRUPT_KEY
                    else encode(Image.new("RGB", (40, 48), (n * 20, 0, 0)), "PNG")
                )
                sample = {"__key__": key, "png" if n % 2 else "jpg": image}
                if n % 3 == 0:
                    sample["txt"] = f"caption {n}"
                elif n % 3 == 1:
                    sample["caption"] = f"caption {n}"
                else:
                    sample["json"] = json.dumps({"text": f"caption {n}"}).encode()
                writer.write(sample)
    return str(root / "{00000..00003}.tar")


def keys(batch: dict) -> list[str]:
    return [record_id.rsplit(":", 1)[1] for record_id in batch["record_id"]]


def test_webdataset_streams_and_replaces_corrupt_samples(shards: str) -> None:
    stream = WebDatasetSource(shards, ImageTransform(R), seed=3, batch_size=NUM_SHARDS * PER_SHARD, shuffle_buffer=0)
    assert len(stream.shards) == NUM_SHARDS
    (batch,) = [b for b, _ in zip(stream.dataloader(), range(1), strict=False)]
    seen = keys(batch)
    # One epoch: every sample once, except the corrupt one, whose slot holds the next sample of the stream.
    corrupt_slot = seen.index(f"s{int(CORRUPT_KEY[1:]) + 1:03d}")
    assert set(seen) == {f"s{n:03d}" for n in range(NUM_SHARDS * PER_SHARD)} - {CORRUPT_KEY}
    assert seen[corrupt_slot + 1] == seen[corrupt_slot]
    assert len(batch["skipped"]) == 1 and CORRUPT_KEY in batch["skipped"][0]
    assert batch["caption"] == [f"caption {int(k[1:])}" for k in seen]
    assert batch["pixel_values"].shape == (NUM_SHARDS * PER_SHARD, 3, R, R)
    assert batch["step"].tolist() == [0] * len(seen) and batch["position"].tolist() == list(range(len(seen)))
    # The augmentation of a slot is the map-style one: flip drawn first from the slot's generator.
    expected = [bool(torch.rand((), generator=sample_generator(3, 0, p, STREAM_DATA)) < 0.5) for p in range(12)]
    assert batch["flipped"].tolist() == expected


def test_webdataset_splits_shards_across_ranks(shards: str) -> None:
    ranks = [WebDatasetSource(shards, ImageTransform(R), 3, 2, rank=r, world_size=2, shuffle_buffer=0) for r in (0, 1)]
    for epoch in range(3):
        mine = [set(rank.shards_for(epoch)) for rank in ranks]
        assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == NUM_SHARDS
        readers = [set(ranks[0].shards_for(epoch, reader, 2)) for reader in (0, 1)]
        assert not readers[0] & readers[1] and readers[0] | readers[1] == mine[0]
    per_epoch = NUM_SHARDS // 2 * PER_SHARD
    read = [[s["__key__"] for s, _ in zip(rank.raw_samples(), range(per_epoch), strict=False)] for rank in ranks]
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == [f"s{n:03d}" for n in range(NUM_SHARDS * PER_SHARD)]


def test_webdataset_resume_continues_the_stream(shards: str) -> None:
    def batches(start_step: int, count: int) -> list[dict]:
        stream = WebDatasetSource(shards, ImageTransform(R), 3, 2, start_step=start_step, shuffle_buffer=4)
        return [b for b, _ in zip(stream.dataloader(num_workers=2), range(count), strict=False)]

    full, resumed = batches(0, 8), batches(3, 5)
    assert [b["step"][0].item() for b in full] == list(range(8))
    for a, b in zip(full[3:], resumed, strict=True):
        assert keys(a) == keys(b) and torch.equal(a["pixel_values"], b["pixel_values"])
        assert a["skipped"] == b["skipped"]
    assert len({k for b in full for k in keys(b)}) >= 10  # both workers' shards, over an epoch boundary
