"""The demo page (``bksdm serve``) with the bundled SD3-shaped teacher and its keep-half student, side by side, in a
real headless Chromium (as ``test_serve.py`` does for the U-Net teacher)."""

from __future__ import annotations

import re

import pytest

from bksdm.loading import teacher_or_default
from bksdm.plan.prune import prune
from bksdm.use.serve.app import DemoApp, SamplingSettings, load_models
from tests.use.test_serve import browser, generate_on_page, open_page, serving  # noqa: F401  (browser: the fixture)

PROMPT = "a big blue square at the bottom right"


@pytest.fixture(scope="module")
def sd3_app(tmp_path_factory: pytest.TempPathFactory) -> DemoApp:
    student = tmp_path_factory.mktemp("serve-sd3") / "keep-half"
    prune("bundled-sd3", "keep-half", student)
    models = load_models(teacher_or_default("bundled-sd3"), [str(student)])
    return DemoApp(models, SamplingSettings(steps=4, guidance_scale=2.0))


@pytest.fixture(scope="module")
def sd3_server(sd3_app: DemoApp):
    with serving(sd3_app) as httpd:
        yield httpd


@pytest.mark.slow
def test_page_shows_the_transformer_teacher_and_its_student_side_by_side(sd3_server, sd3_app, browser) -> None:  # noqa: F811
    page, problems = open_page(browser, sd3_server.url)
    assert page.locator("figure.model").evaluate_all("els => els.map(e => e.dataset.model)") == ["teacher", "student"]
    shown = generate_on_page(page, PROMPT, 3, timeout_ms=120_000)
    expected = sd3_app.generate(PROMPT, 3)["models"]
    assert [s["name"] for s in shown] == ["teacher", "student"]
    for panel, result in zip(shown, expected, strict=True):
        assert panel["width"] == 64  # the SD3-shaped teacher's native size
        assert panel["src"] == result["image"]  # exactly what the API gives for this prompt and seed
    assert shown[0]["src"] != shown[1]["src"]  # two models, two images
    assert re.fullmatch(r"\d+\.\d\d s \(\d+\.\d\dx the teacher's speed\)", shown[1]["time"]), shown[1]["time"]
    assert problems == [], problems
    page.close()
