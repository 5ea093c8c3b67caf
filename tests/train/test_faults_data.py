"""Bad data and evaluation inputs (issue 11): each case ends in one clear message naming the file (and line) and the
fix, never a traceback, a silently shortened data set, a retry loop or code run from a file.

Kept as regression tests: a stray quote in metadata.csv, UTF-16 / non-UTF-8 metadata, a data folder without (or
with an empty) metadata file, data with no usable record, hf: data offline, a manifest that lists fewer images
than its folder, unreadable images in evaluate and report, and a crafted pickle given as Inception weights.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import shapes_folder
from PIL import Image
from torch.utils.data import DataLoader

from bksdm.cli import main
from bksdm.eval.evaluate import EvaluationError, evaluate
from bksdm.eval.image_sets import read_manifest
from bksdm.eval.inception import InceptionV3, load_inception
from bksdm.eval.report import ReportError, ReportOptions, write_report
from bksdm.train.data import (
    DataError,
    DistillDataset,
    FolderSource,
    GlobalBatchSampler,
    ImageTransform,
    MissingPackageError,
    UnusableDataError,
    collate,
    open_source,
    require_usable,
)

ROWS = [(f"{i:03d}.png", f"caption {i}") for i in range(16)]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _write_images(folder: Path, count: int = 16, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _metadata(folder: Path, lines: list[str], name: str = "metadata.csv", encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def _csv_lines(rows=ROWS) -> list[str]:
    return ["file_name,text", *[f"{file},{caption}" for file, caption in rows]]


# ------------------------------------------------------------------------------------------- CSV parsing


@pytest.mark.parametrize(
    ("row_4", "row_10", "expected"),
    [
        # The issue's case: read as 4 records, the 4th caption holding the 12 following lines, without a word.
        ('003.png,"caption 3 with a stray quote', None, "line 5: a double quote opened in the record that starts "
         "there is never closed (the field runs to the end of the file, line 17)"),
        # A second stray quote closes the first: valid CSV, but rows 4-9 became one caption.
        ('003.png,"caption 3 with a stray quote', '009.png,caption 9"', "line 5: a double quote in the record that "
         "starts there is closed only 1 line(s) later, so the rows in between became part of one field"),
        ('003.png,"caption 3" and more', None, "line 5: malformed CSV (',' expected after '\"')"),
        ("003.png,caption 3, with a comma", None, "line 5: 3 fields, but the header has 2 (file_name,text)"),
        ("003.png", None, "line 5: 1 field, but the header has 2 (file_name,text)"),
    ],
)  # fmt: skip
def test_malformed_csv_names_the_line(tmp_path: Path, row_4: str, row_10: str | None, expected: str) -> None:
    lines = _csv_lines()
    lines[4] = row_4
    if row_10 is not None:
        lines[10] = row_10
    path = _metadata(tmp_path, lines)
    with pytest.raises(DataError) as info:
        FolderSource(tmp_path)
    assert str(info.value).startswith(f"{path}, {expected}")
    assert 'each double quote inside it doubled ("")' in str(info.value)  # how to fix it


def test_properly_quoted_captions_still_read(tmp_path: Path) -> None:
    captions = [f"caption {i}" for i in range(16)]
    captions[3] = 'a "quoted" caption, with commas,\nand a line break'
    captions[4] = "a caption naming a file\nlike 004.png, on its second line"  # not a swallowed row: 1 field
    with (tmp_path / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text", "aesthetic"])
        writer.writerows([(f"{i:03d}.png", c, "6.5") for i, c in enumerate(captions)])
        f.write("\n\n")  # trailing blank lines
    source = FolderSource(tmp_path)
    assert [source[i][1] for i in range(len(source))] == captions


def test_a_stray_quote_stops_the_cli_with_the_line(tmp_path: Path, tiny_sd_dir: Path, capsys) -> None:
    _write_images(tmp_path / "data")
    lines = _csv_lines()
    lines[4] = '003.png,"caption 3 with a stray quote'
    _metadata(tmp_path / "data", lines)
    code, _, err = _run(capsys, "cache", "--out", str(tmp_path / "cache"), f"model.teacher={tiny_sd_dir}",
                        f"data.train={tmp_path / 'data'}", "data.resolution=32")  # fmt: skip
    assert code == 2
    assert f"error: {tmp_path / 'data' / 'metadata.csv'}, line 5: a double quote opened" in err


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"file_name": "001.png", "text": ', "line 3: not valid JSON (Expecting value at character 34)"),
        ('["001.png", "caption 1"]', "line 3: a JSON list, not an object"),
        ("null", "line 3: a JSON null, not an object"),
        ("[" * 100_000, "line 3: JSON nested too deeply to read"),
    ],
)
def test_a_malformed_jsonl_line_is_an_error_naming_it(tmp_path: Path, bad_line: str, expected: str) -> None:
    """It was skipped with a warning: the data set shrank silently (the sweep's cache/data-jsonl-bad-line)."""
    rows = [json.dumps({"file_name": f, "text": c}) for f, c in ROWS[:4]]
    path = _metadata(tmp_path, [rows[0], "", bad_line, *rows[2:]], name="metadata.jsonl")
    with pytest.raises(DataError) as info:
        open_source(tmp_path)
    assert str(info.value).startswith(f"{path}, {expected}; it needs one JSON object per image and line")
    assert "fix or delete the line" in str(info.value)


def test_a_malformed_jsonl_line_stops_the_cli_with_the_line(tmp_path: Path, tiny_sd_dir: Path, capsys) -> None:
    _write_images(tmp_path / "data", 2)
    lines = ['{"file_name": "000.png", "text": "a"}', '{"file_name": ', '{"file_name": "001.png", "text": "b"}', "x"]
    path = _metadata(tmp_path / "data", lines, name="metadata.jsonl")
    code, out, err = _run(capsys, "cache", "--out", str(tmp_path / "cache"), f"model.teacher={tiny_sd_dir}",
                          f"data.train={tmp_path / 'data'}", "data.resolution=32")  # fmt: skip
    assert code == 2 and "cached" not in out
    assert f"error: {path}, line 2: not valid JSON" in err and "(and 1 more malformed line(s))" in err
    assert not list((tmp_path / "cache").rglob("*"))  # nothing cached (cache makes the empty folder first)


# -------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    ("name", "encoding", "expected"),
    [
        ("metadata.csv", "utf-16", "is saved as UTF-16 (it starts with a UTF-16 byte-order mark)"),
        ("metadata.csv", "utf-32", "is saved as UTF-32 (it starts with a UTF-32 byte-order mark)"),
        ("metadata.csv", "utf-16-le", "holds NUL bytes in its first line: it is probably saved as UTF-16"),
        ("metadata.jsonl", "utf-16", "is saved as UTF-16 (it starts with a UTF-16 byte-order mark)"),
    ],
)
def test_utf16_and_utf32_metadata_name_the_encoding(tmp_path: Path, name: str, encoding: str, expected: str) -> None:
    lines = _csv_lines() if name.endswith(".csv") else [json.dumps({"file_name": f, "text": c}) for f, c in ROWS]
    path = _metadata(tmp_path, lines, name, encoding)
    with pytest.raises(DataError) as info:
        FolderSource(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path} {expected}") and "Save it as UTF-8" in message
    assert "missing column" not in message


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_non_utf8_metadata_names_line_and_byte(tmp_path: Path, name: str) -> None:
    rows = list(ROWS)
    rows[5] = ("005.png", "un café")  # é in Windows-1252: the byte 0xe9
    lines = (
        _csv_lines(rows)
        if name.endswith(".csv")
        else [json.dumps({"file_name": f, "text": c}, ensure_ascii=False) for f, c in rows]
    )
    path = _metadata(tmp_path, lines, name, "cp1252")
    offset = path.read_bytes().index(b"\xe9")
    line = 7 if name.endswith(".csv") else 6  # the csv has a header line
    with pytest.raises(DataError) as info:
        FolderSource(tmp_path)
    assert str(info.value).startswith(f"{path}, line {line} (byte {offset}): b'\\xe9")
    assert "Save the file as UTF-8" in str(info.value)


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_utf8_with_a_byte_order_mark_reads(tmp_path: Path, name: str) -> None:
    lines = _csv_lines() if name.endswith(".csv") else [json.dumps({"file_name": f, "text": c}) for f, c in ROWS]
    _metadata(tmp_path, lines, name, "utf-8-sig")
    source = FolderSource(tmp_path)
    assert len(source) == 16 and source[0][1] == "caption 0" and Path(source[0][0]).name == "000.png"


# ------------------------------------------------------------------ missing, empty and unusable data


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "has no metadata.csv or metadata.jsonl: a data folder needs one"),
        (b"", "metadata.csv is empty; it needs a header line naming the columns (file_name,text)"),
        (b"\n\n  \n", "metadata.csv holds only blank lines; it needs a header line"),
        (b"file_name,text\n", "metadata.csv holds no records; it needs a header line"),
    ],
)
def test_missing_or_empty_metadata(tmp_path: Path, content: bytes | None, expected: str) -> None:
    _write_images(tmp_path, 2)
    if content is not None:
        (tmp_path / "metadata.csv").write_bytes(content)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        open_source(tmp_path)


def test_empty_jsonl_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(DataError, match=r"metadata\.jsonl is empty; it needs one JSON object per image and line"):
        open_source(tmp_path)
    with pytest.raises(DataError, match="image folder not found"):
        FolderSource(tmp_path / "nowhere")


def test_folder_without_metadata_exits_2(tmp_path: Path, tiny_sd_dir: Path, capsys) -> None:
    _write_images(tmp_path / "data", 2)  # images only, as a user may first try
    code, _, err = _run(capsys, "cache", "--out", str(tmp_path / "cache"), f"model.teacher={tiny_sd_dir}",
                        f"data.train={tmp_path / 'data'}")  # fmt: skip
    assert code == 2 and "has no metadata.csv or metadata.jsonl" in err


def test_no_usable_record_is_one_clear_error_even_from_a_worker(tmp_path: Path) -> None:
    _metadata(tmp_path, _csv_lines(ROWS[:4]))  # no image file exists
    source = FolderSource(tmp_path)
    dataset = DistillDataset(source, ImageTransform(32), seed=0)
    sampler = GlobalBatchSampler(len(dataset), 2, seed=0, max_steps=1)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=1)
    with pytest.raises(UnusableDataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI's exit 2
    assert message.startswith(f"all 4 records of {tmp_path / 'metadata.csv'} are unusable: the data or its paths")
    assert f"{tmp_path / '000.png'}: FileNotFoundError" in message
    assert "Traceback" not in message and "Caught" not in message


def test_require_usable() -> None:
    require_usable(1, ["a: no image"], "DIR")
    with pytest.raises(UnusableDataError, match=r"all 2 records of DIR are unusable.*\n  a: no image\n  b: empty"):
        require_usable(0, ["a: no image", "b: empty caption"], "DIR")


# ------------------------------------------------------------------------------------------ hf: offline


def test_hf_data_with_the_hub_unreachable_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        open_source("hf:someone/some-captions")
    assert time.perf_counter() - started < 5  # the hub client alone retried for ~25 s
    assert str(info.value).startswith("hf:someone/some-captions: cannot reach the Hugging Face Hub (127.0.0.1:9: ")
    assert "set HF_HUB_OFFLINE=1 to use the cached copy" in str(info.value)


def test_hf_data_fails_fast_on_this_machine_whatever_its_network() -> None:
    pytest.importorskip("datasets")
    started = time.perf_counter()
    with pytest.raises(DataError, match="hf:bksdm-tests/no-such-dataset-3f9a1c: "):  # unreachable or not found
        open_source("hf:bksdm-tests/no-such-dataset-3f9a1c")
    assert time.perf_counter() - started < 20


def test_hf_data_with_hf_hub_offline(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    code = (
        "import time; from bksdm.train.data import DataError, open_source\n"
        "t = time.perf_counter()\n"
        "try:\n    open_source('hf:someone/some-captions')\n"
        "except DataError as e:\n    print(f'{time.perf_counter() - t:.1f}', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    seconds, _, message = done.stdout.strip().partition(" ")
    assert message.startswith("hf:someone/some-captions: HF_HUB_OFFLINE is set and the data set is not in the local "
                              f"cache ({tmp_path / 'cache'})"), done.stdout + done.stderr  # fmt: skip
    assert float(seconds) < 10


def test_hf_data_without_datasets_exits_2(tmp_path: Path, tiny_sd_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(MissingPackageError) as info:
        open_source("hf:someone/some-captions")
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    code, _, err = _run(capsys, "cache", "--out", str(tmp_path / "cache"), f"model.teacher={tiny_sd_dir}",
                        "data.train=hf:someone/some-captions")  # fmt: skip
    assert code == 2 and "pip install datasets" in err


# -------------------------------------------------------------------------------- evaluate and report


def test_a_manifest_listing_fewer_images_than_the_folder(tmp_path: Path, capsys) -> None:
    shapes_folder(tmp_path / "gen", 12, listed=1)
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), "--shapes-reference-count", "300")
    assert code == 2
    assert (
        f"error: the shapes metrics needs at least 2 images, but the manifest {tmp_path / 'gen' / 'manifest.jsonl'} "
        f"lists 1 image(s), but {tmp_path / 'gen'} holds 12 image file(s): is the manifest from another or an "
        "unfinished run?"
    ) in err
    assert "features: need" not in err


def test_a_manifest_listing_missing_images(tmp_path: Path, capsys) -> None:
    shapes_folder(tmp_path / "gen", 3)
    (tmp_path / "gen" / "000001.png").unlink()
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"))
    manifest = tmp_path / "gen" / "manifest.jsonl"
    assert code == 2 and f"1 of the 3 image(s) that the manifest {manifest} lists are missing" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (json.dumps({"file": 5, "prompt": "a cat"}), ":1: 'file' must be a file name (a string), got 5"),
        (json.dumps({"file": "a.png", "prompt": "a cat", "seed": "x"}), ":1: 'seed' must be an integer, got 'x'"),
        (json.dumps({"file": "a.png", "prompt": ["a cat"]}), ":1: 'prompt' must be a string"),
    ],
)
def test_manifest_values_are_checked(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "manifest.jsonl").write_text(content + "\n")
    with pytest.raises(EvaluationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(tmp_path / "manifest.jsonl")


def test_a_utf16_manifest_names_the_encoding(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"file": "a.png", "prompt": "x"}) + "\n", encoding="utf-16")
    with pytest.raises(EvaluationError, match=r"manifest\.jsonl is saved as UTF-16"):
        read_manifest(tmp_path / "manifest.jsonl")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A narrow FID Inception with random weights (as in test_evaluate), saved as a plain state dict."""
    torch.manual_seed(0)
    net = InceptionV3(width=1 / 8)
    with torch.no_grad():
        net.fc.weight.mul_(300)
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, inception_file: Path, capsys) -> None:
    good, messy = tmp_path / "good", tmp_path / "messy"
    _write_images(good, 6, seed=1)
    _write_images(messy, 6, seed=1)
    (messy / "100.png").write_text("not an image")
    (messy / "101.png").write_bytes((good / "000.png").read_bytes()[:60])  # truncated
    args = ["--metrics", "is", "--is-splits", "2", "--inception-weights", str(inception_file), "--device", "cpu"]
    for folder in (good, messy):
        code, stdout, err = _run(capsys, "evaluate", "--images", str(folder), *args)
        assert code == 0, err
    clean = json.loads((good / "evaluation.json").read_text())
    result = json.loads((messy / "evaluation.json").read_text())
    assert result["count"] == 6 and clean["count"] == 6 and clean["skipped"] == []
    assert [s.split(":")[0] for s in result["skipped"]] == [str(messy / "100.png"), str(messy / "101.png")]
    assert result["metrics"] == clean["metrics"]  # the unreadable images change nothing
    assert "(2 unreadable, skipped" in stdout


def test_too_few_readable_images_say_so(tmp_path: Path, inception_file: Path, capsys) -> None:
    _write_images(tmp_path / "gen", 3, seed=2)
    _write_images(tmp_path / "ref", 1, seed=3)
    (tmp_path / "ref" / "001.png").write_text("not an image")
    common = ["--inception-weights", str(inception_file), "--device", "cpu", "--metrics"]
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), *common, "fid",
                        "--ref-images", str(tmp_path / "ref"))  # fmt: skip
    assert (
        code == 2
        and (
            f"reference images: {tmp_path / 'ref'} holds 2 image(s), 1 of them unreadable ({tmp_path / 'ref'}/001.png: "
        )
        in err
        and "FID statistics need at least 2 readable images" in err
    )
    (tmp_path / "gen" / "001.png").write_text("not an image")
    (tmp_path / "gen" / "002.png").write_text("not an image")
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), *common, "is", "--is-splits", "2")
    assert (
        code == 2
        and (
            f"the Inception Score needs at least 2 images (or lower --is-splits), but {tmp_path / 'gen'} holds 3 "
            "image(s) and 2 of them are unreadable"
        )
        in err
    )


def test_report_leaves_an_unreadable_image_out_of_the_grid(tmp_path: Path) -> None:
    prompts = shapes_folder(tmp_path / "a", 4)
    shapes_folder(tmp_path / "b", 4)
    (tmp_path / "b" / "000002.png").write_text("not an image")
    report = write_report(tmp_path / "out", ReportOptions(models={"a": str(tmp_path / "a"), "b": str(tmp_path / "b")},
                                                           profile=False, columns=4))  # fmt: skip
    assert [g["prompt"] for g in report["grid"]] == [prompts[0], prompts[1], prompts[3]]
    assert Image.open(tmp_path / "out" / "grid.png").size[0] > 0
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no partial file left

    (tmp_path / "a" / "evaluation.json").write_text("5")
    with pytest.raises(ReportError, match=r"evaluation .*evaluation\.json is not a JSON object \(it holds a int\)"):
        write_report(tmp_path / "out2", ReportOptions(models={"a": str(tmp_path / "a")}, profile=False))


def test_evaluate_python_api_counts_skipped(tmp_path: Path, inception_file: Path) -> None:
    from bksdm.eval.evaluate import EvaluationOptions

    _write_images(tmp_path, 4, seed=5)
    (tmp_path / "004.png").write_bytes(b"")  # zero bytes
    options = EvaluationOptions(metrics=["is"], is_splits=2, inception_weights=inception_file)
    result = evaluate(tmp_path, options=options)
    assert result["count"] == 4 and len(result["skipped"]) == 1 and "004.png" in result["skipped"][0]


# ------------------------------------------------------------------------- Inception weights: a pickle


class _Touch:
    """Unpickling this calls ``os.system("touch MARKER")``: what a crafted weight file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["pickle-2", "pickle-4", "torch.save"])
def test_a_crafted_pickle_as_inception_weights_runs_nothing(tmp_path: Path, kind: str, capsys) -> None:
    marker = tmp_path / "PWNED"
    weights = tmp_path / "inception.pth"
    if kind == "torch.save":
        torch.save({"Conv2d_1a_3x3.conv.weight": _Touch(marker)}, weights)
    else:
        weights.write_bytes(pickle.dumps(_Touch(marker), protocol=int(kind[-1])))
    # The file is live: an unrestricted unpickler runs its command (in a child, on another marker).
    live = tmp_path / "LIVE"
    probe = weights.with_suffix(".probe")
    probe.write_bytes(pickle.dumps(_Touch(live), protocol=2))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(probe)!r}, 'rb'))"], check=True)
    assert live.exists()

    with pytest.raises(ValueError, match="holds pickled Python objects other than tensors") as info:
        load_inception(weights)
    assert "nothing was run" in str(info.value) and "weights_only=False" not in str(info.value)
    _write_images(tmp_path / "gen", 10)
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), "--metrics", "is",
                        "--inception-weights", str(weights), "--device", "cpu")  # fmt: skip
    assert code == 2 and f"error: {weights} holds pickled Python objects" in err
    assert not marker.exists()


def test_corrupt_inception_weights_are_a_clear_error(tmp_path: Path) -> None:
    for name in ("junk.pth", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"hello world, not weights")
        with pytest.raises(ValueError, match=f"{name} cannot be read as a weight file .*give a state dict of tensors"):
            load_inception(tmp_path / name)


# ------------------------------------------------------------------------ evaluate: the sweep's last cases


def _is_args(inception_file: Path) -> list[str]:
    return ["--metrics", "is", "--is-splits", "2", "--inception-weights", str(inception_file), "--device", "cpu"]


def test_a_symlink_loop_among_the_images_is_skipped_and_counted(tmp_path: Path, inception_file: Path, capsys) -> None:
    """It was neither read nor counted: ``is_file()`` is False for a loop (the sweep's one-image-symlink-loop)."""
    _write_images(tmp_path / "gen", 4, seed=1)
    os.symlink("100.png", tmp_path / "gen" / "100.png")  # points at itself
    os.symlink("nowhere.png", tmp_path / "gen" / "101.png")  # a dangling link
    (tmp_path / "gen" / "102.png").mkdir()  # a folder named like an image is no image file: not listed
    code, stdout, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), *_is_args(inception_file))
    assert code == 0, err
    result = json.loads((tmp_path / "gen" / "evaluation.json").read_text())
    assert result["count"] == 4
    assert [s.split(": ")[0] for s in result["skipped"]] == [str(tmp_path / "gen" / n) for n in ("100.png", "101.png")]
    assert "Too many levels of symbolic links" in result["skipped"][0]
    assert "(2 unreadable, skipped" in stdout


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--device", "tpu"], "--device tpu: not a device bksdm runs on; use cpu, cuda or cuda:N"),
        (["--resize", "0"], "--resize 0: give the side in pixels to resize to, from 1 to 4096 (the paper's is 256)"),
        (["--resize", "-256"], "--resize -256: give the side in pixels to resize to, from 1 to 4096"),
        (["--resize", "100000"], "--resize 100000: give the side in pixels to resize to, from 1 to 4096"),
        (["--metrics", "fid", "--ref-images", "{gen}", "--ref-resize", "0"], "--ref-resize 0: give the side in"),
    ],
)
def test_bad_device_and_resize_are_refused(tmp_path: Path, inception_file: Path, capsys, flags, expected) -> None:
    """``--device tpu`` was a traceback; ``--resize 0`` was taken as no resize, silently."""
    _write_images(tmp_path / "gen", 3, seed=1)
    flags = [f.format(gen=tmp_path / "gen") for f in flags]
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), *_is_args(inception_file), *flags)
    assert code == 2 and f"bksdm evaluate: error: {expected}" in err, err
    assert "Traceback" not in err and not (tmp_path / "gen" / "evaluation.json").exists()


def test_fid_stats_refuses_resize_zero(tmp_path: Path, inception_file: Path, capsys) -> None:
    _write_images(tmp_path / "real", 3)
    code, _, err = _run(capsys, "fid-stats", str(tmp_path / "real"), "--out", str(tmp_path / "s.npz"), "--resize",
                        "0", "--inception-weights", str(inception_file), "--device", "cpu")  # fmt: skip
    assert code == 2 and "error: --resize 0: give the side in pixels" in err and not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("key", ["mu", "sigma", "features"])
def test_a_reference_holding_nan_is_refused(tmp_path: Path, inception_file: Path, capsys, key: str) -> None:
    """It gave ``"fid": NaN`` in evaluation.json, which is not JSON (the sweep's ref-npz-nan)."""
    _write_images(tmp_path / "gen", 3, seed=1)
    dim = 2048 // 8  # the narrow test Inception's features
    arrays = {"mu": np.zeros(dim), "sigma": np.eye(dim), "features": np.zeros((4, dim), dtype=np.float32)}
    arrays[key] = arrays[key].copy()
    arrays[key].flat[1] = np.nan if key != "sigma" else np.inf
    np.savez(tmp_path / "ref.npz", **arrays)
    ref = ["--metrics", "fid", "--ref", str(tmp_path / "ref.npz")]
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), *ref, *_is_args(inception_file)[4:])
    assert code == 2
    assert f"error: {tmp_path / 'ref.npz'}: '{key}' holds 1 NaN or infinite value(s)" in err
    assert "make it again with `bksdm fid-stats" in err and "loading Inception" not in err
    assert not (tmp_path / "gen" / "evaluation.json").exists()


def test_weights_holding_nan_give_an_error_not_a_figure(tmp_path: Path, inception_file: Path, capsys) -> None:
    """Inception weights holding NaN gave an Inception Score of exactly 1.0 (NaN probabilities count as 0)."""
    _write_images(tmp_path / "gen", 3, seed=1)
    state = torch.load(inception_file, weights_only=True)
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), *_is_args(tmp_path / "nan.pth"))
    assert code == 2, err
    assert (
        f"error: Inception-v3 gave NaN or infinite outputs for the images from {tmp_path / 'gen' / '000.png'} on: "
        f"its weights ({tmp_path / 'nan.pth'}) hold non-finite values"
    ) in err
    assert not (tmp_path / "gen" / "evaluation.json").exists()


def test_offline_clip_from_the_hub_fails_at_once(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--offline`` came too late for the hub libraries (they read HF_HUB_OFFLINE at import): ~40 s of retries."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, as is the flag below
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    shapes_folder(tmp_path / "gen", 2)
    started = time.perf_counter()
    code, _, err = _run(capsys, "evaluate", "--images", str(tmp_path / "gen"), "--metrics", "clip", "--clip-model",
                        "hf:nobody-here/no-such-clip", "--offline", "--device", "cpu")  # fmt: skip
    seconds = time.perf_counter() - started
    assert code == 2 and "cannot load the Hugging Face CLIP model 'nobody-here/no-such-clip'" in err
    assert seconds < 5, f"{seconds:.1f} s"
