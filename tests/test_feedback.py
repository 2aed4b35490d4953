"""POST /feedback and REVIEW_BELOW_SCORE: a wrong answer's image kept under the right label in
FEEDBACK_DIR, the low-confidence uploads in FEEDBACK_DIR/_review, and retrain.py training on
them with --extra_image_dir. In-process with the colour model, then the round trip on the real
server."""
import io
import json
import os
import shutil

import imagegen as ig
import pytest
import requests
from helpers import assert_envelope, post_image, start_server

from app import create_app
from common import feedback as feedback_module
from common.config import Config, ConfigError
from common.feedback import REVIEW

NAME = "0123456789abcdef.png"  # a name the store could give, but never gave


@pytest.fixture
def feedback_dir(tmp_path) -> str:
    return str(tmp_path / "feedback")


def make_app(classifier, tmp_path, **settings):
    return create_app({"temp_dir": str(tmp_path / "temp"),
                       "feedback_dir": str(tmp_path / "feedback"), **settings},
                      classifier=classifier)


@pytest.fixture
def fb(classifier, tmp_path):
    return make_app(classifier, tmp_path).test_client()


def classify(client, data: bytes) -> dict:
    response = client.post("/classify", data={"image": (io.BytesIO(data), "x.png")})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def files(folder) -> list[str]:
    """The names in ``folder`` but the service's hidden ones (its lock, index and count)."""
    return sorted(f for f in os.listdir(folder) if not f.startswith(".")) \
        if os.path.isdir(folder) else []


def test_feedback_keeps_the_image_under_the_right_label(fb, feedback_dir):
    data = ig.png(ig.RED)
    answer = classify(fb, data)
    assert answer["predictions"][0]["label"] == "red"
    stem = answer["filename"].split(".")[0]
    response = fb.post("/feedback", json={"filename": answer["filename"], "label": "blue",
                                          "predicted": "red", "score": 0.9})
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert body == {"filename": answer["filename"], "label": "blue",
                    "model": {"name": "colours", "version": "7"},
                    "saved": f"feedback/blue/{answer['filename']}", "created": True,
                    "moved_from": None}
    assert files(feedback_dir) == ["blue"]
    assert files(os.path.join(feedback_dir, "blue")) == sorted([answer["filename"],
                                                                 stem + ".json"])
    with open(os.path.join(feedback_dir, "blue", answer["filename"]), "rb") as fh:
        assert fh.read() == data
    with open(os.path.join(feedback_dir, "blue", stem + ".json")) as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 1
    note = json.loads(lines[0])
    assert {k: note[k] for k in ("filename", "label", "model", "version", "predicted",
                                 "score")} == {
        "filename": answer["filename"], "label": "blue", "model": "colours", "version": "7",
        "predicted": "red", "score": 0.9}
    assert note["time"].endswith("Z")


def test_the_same_feedback_again_changes_nothing(fb, feedback_dir):
    filename = classify(fb, ig.png(ig.GREEN))["filename"]
    first = fb.post("/feedback", json={"filename": filename, "label": "red"})
    note = os.path.join(feedback_dir, "red", filename.split(".")[0] + ".json")
    before = open(note).read()
    again = fb.post("/feedback", data={"filename": filename, "label": "red"})  # a form body
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["created"] is False
    assert open(note).read() == before
    assert len(files(os.path.join(feedback_dir, "red"))) == 2


def test_another_label_moves_the_image_and_case_follows_the_model(fb, feedback_dir):
    filename = classify(fb, ig.png(ig.BLUE))["filename"]
    fb.post("/feedback", json={"filename": filename, "label": "red"})
    response = fb.post("/feedback", json={"filename": filename, "label": "GREEN"})
    assert response.status_code == 201
    assert response.get_json()["label"] == "green"
    assert response.get_json()["moved_from"] == "red"
    assert files(os.path.join(feedback_dir, "red")) == []
    assert filename in files(os.path.join(feedback_dir, "green"))


@pytest.mark.parametrize("filename", [
    "../../etc/passwd", "/etc/passwd", NAME + "/../x", "0123456789ABCDEF.png",
    NAME + "\n", "0123456789abcde.png", "0123456789abcdef.png.json", "x", "", 12, None,
    ["a"], "0123456789abcdef.toolong",
])
def test_only_names_the_store_gives_are_accepted(fb, feedback_dir, filename):
    response = fb.post("/feedback", json={"filename": filename, "label": "red"})
    assert_envelope(response, 400, "invalid_filename")
    assert files(feedback_dir) == []


def test_unknown_and_evicted_images_are_404(fb, tmp_path, feedback_dir):
    assert_envelope(fb.post("/feedback", json={"filename": NAME, "label": "red"}), 404,
                    "image_not_found")
    filename = classify(fb, ig.png(ig.RED))["filename"]
    os.unlink(tmp_path / "temp" / filename)  # evicted from temp/
    assert_envelope(fb.post("/feedback", json={"filename": filename, "label": "red"}), 404,
                    "image_not_found")
    assert files(feedback_dir) == []


@pytest.mark.parametrize("label,code", [
    ("", "invalid_label"), (" ", "invalid_label"), (None, "invalid_label"), (3, "invalid_label"),
    ("../red", "invalid_label"), ("a/b", "invalid_label"), ("a\\b", "invalid_label"),
    (".hidden", "invalid_label"), ("..", "invalid_label"), (REVIEW, "invalid_label"),
    ("x" * 65, "invalid_label"), ("tab\there", "invalid_label"), (" red", "invalid_label"),
    ("red.", "invalid_label"), ("nul\x00", "invalid_label"), ("purple", "unknown_label"),
])
def test_bad_labels_are_400(fb, feedback_dir, label, code):
    filename = classify(fb, ig.png(ig.RED))["filename"]
    assert_envelope(fb.post("/feedback", json={"filename": filename, "label": label}), 400,
                    code)
    assert files(feedback_dir) == []


def test_new_labels_when_allowed(classifier, tmp_path, feedback_dir):
    client = make_app(classifier, tmp_path, feedback_new_labels=True).test_client()
    filename = classify(client, ig.png(ig.RED))["filename"]
    response = client.post("/feedback", json={"filename": filename, "label": "purple"})
    assert response.status_code == 201
    assert filename in files(os.path.join(feedback_dir, "purple"))
    assert_envelope(client.post("/feedback", json={"filename": filename, "label": "../x"}),
                    400, "invalid_label")  # still no paths


def test_feedback_switched_off(classifier, tmp_path):
    client = make_app(classifier, tmp_path, feedback_dir=None).test_client()
    filename = classify(client, ig.png(ig.RED))["filename"]
    assert_envelope(client.post("/feedback", json={"filename": filename, "label": "red"}), 403,
                    "feedback_disabled")
    assert "feedback" not in os.listdir(tmp_path)
    assert 'id="feedback"' not in client.get("/").get_data(as_text=True)  # no buttons
    assert Config.from_env({"FEEDBACK_DIR": "OFF"}).feedback_dir is None
    assert Config.from_env({"FEEDBACK_DIR": ""}).feedback_dir == "feedback"


def test_a_folder_filled_before_the_index_is_found(fb, feedback_dir):
    """Pictures a person (or an older version) put in a label folder are found when they are
    relabelled: the index is built from the folders when there is none."""
    filename = classify(fb, ig.png(ig.GREEN))["filename"]
    os.makedirs(os.path.join(feedback_dir, "red"))
    with open(os.path.join(feedback_dir, "red", filename), "wb") as fh:
        fh.write(b"kept before")
    response = fb.post("/feedback", json={"filename": filename, "label": "blue"})
    assert response.status_code == 201 and response.get_json()["moved_from"] == "red"
    assert files(feedback_dir) == ["blue"]


def test_a_folder_emptied_by_hand_is_counted_again(classifier, tmp_path, feedback_dir,
                                                     monkeypatch):
    """Retrain, then empty the folder: once the count is old it is recounted from the folders,
    so the room comes back (and the index forgets what was removed)."""
    client = make_app(classifier, tmp_path, feedback_max_files=1).test_client()
    first = classify(client, ig.png(ig.RED))["filename"]
    second = classify(client, ig.png(ig.GREEN))["filename"]
    assert client.post("/feedback", json={"filename": first, "label": "red"}).status_code == 201
    assert_envelope(client.post("/feedback", json={"filename": second, "label": "green"}), 507,
                    "feedback_full")
    shutil.rmtree(os.path.join(feedback_dir, "red"))  # what retraining has used
    monkeypatch.setattr(feedback_module, "USAGE_RECOUNT_SECONDS", 0.0)
    assert client.post("/feedback", json={"filename": second, "label": "green"}
                       ).status_code == 201
    assert os.listdir(os.path.join(feedback_dir, ".state", "index")) == [second]


@pytest.mark.parametrize("caps", [{"feedback_max_files": 1}, {"feedback_max_mb": 0.0001}])
def test_the_folder_is_capped(classifier, tmp_path, feedback_dir, caps):
    client = make_app(classifier, tmp_path, **caps).test_client()
    small = ig.png(ig.RED, size=(8, 8))  # under 100 bytes: fits the byte cap once
    first = classify(client, small)["filename"]
    second = classify(client, ig.encode(ig.noisy(ig.GREEN, (60, 60)), "PNG"))["filename"]
    if "feedback_max_files" in caps:
        assert client.post("/feedback", json={"filename": first, "label": "red"}
                           ).status_code == 201
        assert client.post("/feedback", json={"filename": first, "label": "red"}
                           ).status_code == 200  # a repeat needs no room
    assert_envelope(client.post("/feedback", json={"filename": second, "label": "green"}), 507,
                    "feedback_full")
    assert second not in files(os.path.join(feedback_dir, "green"))


@pytest.mark.parametrize("kwargs,status,code", [
    ({"data": "filename=x", "content_type": "text/plain"}, 400, "invalid_parameter"),
    ({"data": "{not json", "content_type": "application/json"}, 400, "invalid_parameter"),
    ({"json": ["filename", "label"]}, 400, "invalid_parameter"),
    ({"json": {"filename": NAME, "label": "red", "model": "nope"}}, 404, "model_not_found"),
    ({"json": {"filename": NAME, "label": "red", "version": 99}}, 404, "model_not_found"),
    ({"json": {"filename": NAME, "label": "red", "version": "1.5"}}, 400, "invalid_parameter"),
    ({"json": {"filename": NAME, "label": "red", "version": True}}, 400, "invalid_parameter"),
    ({"json": {"filename": NAME, "label": "red", "model": 7}}, 400, "invalid_parameter"),
    ({"json": {"filename": NAME, "label": "red", "score": 2}}, 400, "invalid_parameter"),
    ({"json": {"filename": NAME, "label": "red", "score": "x"}}, 400, "invalid_parameter"),
    ({"json": {"filename": NAME, "label": "red", "predicted": {}}}, 400, "invalid_parameter"),
    ({"json": {"filename": NAME, "label": "red", "pad": "x" * 20000}}, 413,
     "payload_too_large"),
])
def test_bad_bodies_are_4xx(fb, kwargs, status, code):
    assert_envelope(fb.post("/feedback", **kwargs), status, code)


def test_the_model_and_version_can_be_named(fb, feedback_dir):
    filename = classify(fb, ig.png(ig.RED))["filename"]
    response = fb.post("/feedback", json={"filename": filename, "label": "red",
                                          "model": "default", "version": 1})
    assert response.status_code == 201


def test_low_confidence_uploads_are_kept_for_review(classifier, tmp_path, feedback_dir):
    client = make_app(classifier, tmp_path, review_below_score=0.9).test_client()
    sure = classify(client, ig.png(ig.RED))  # the colour model: ~1.0 for a pure colour
    unsure = classify(client, ig.png((128, 128, 128)))  # grey: a third each
    assert sure["predictions"][0]["score"] > 0.9 > unsure["predictions"][0]["score"]
    review = os.path.join(feedback_dir, REVIEW)
    stem = unsure["filename"].split(".")[0]
    assert files(review) == sorted([unsure["filename"], stem + ".json"])
    with open(os.path.join(review, stem + ".json")) as fh:
        note = json.loads(fh.read())
    assert note["model"] == "colours" and note["below"] == 0.9
    assert [p["label"] for p in note["predictions"]] == [
        p["label"] for p in unsure["predictions"]]
    # several images in one request are reviewed one by one
    response = client.post("/classify", data={"image": [
        (io.BytesIO(ig.png((120, 120, 130))), "a.png"), (io.BytesIO(ig.png(ig.BLUE)), "b.png")]})
    kept, confident = response.get_json()["results"]
    assert kept["filename"] in files(review) and confident["filename"] not in files(review)


def test_review_is_off_by_default_and_capped(classifier, tmp_path, feedback_dir):
    client = make_app(classifier, tmp_path).test_client()
    classify(client, ig.png((128, 128, 128)))
    assert files(feedback_dir) == []
    client = make_app(classifier, tmp_path, review_below_score=0.9,
                      feedback_max_files=1).test_client()
    classify(client, ig.png((128, 128, 128)))
    classify(client, ig.png((100, 100, 100)))  # answered, but not kept: _review is full
    assert len([f for f in files(os.path.join(feedback_dir, REVIEW))
                if f.endswith(".png")]) == 1


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan", "high"])
def test_review_below_score_is_validated(value):
    with pytest.raises(ConfigError, match="REVIEW_BELOW_SCORE"):
        Config.from_env({"REVIEW_BELOW_SCORE": value})


# -- the round trip on the real server, then retrain.py on the feedback ---------------------

@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> str:
    """An untrained (randomly initialised) feature module in TF Hub form: enough to tell solid
    colours apart, saved in a second."""
    from scripts import make_feature_module as mfm

    params = mfm.ModuleParams(input_size=32, channels=(8, 16))
    folder = str(tmp_path_factory.mktemp("module") / "features")
    return mfm.save_module(mfm.build_module(params), folder, params, {})


@pytest.mark.server
def test_round_trip_classify_feedback_retrain(colour_model_dir, tiny_module, tmp_path):
    from scripts import retrain

    server = start_server(tmp_path, {"MODEL_PATH": colour_model_dir, "WORKERS": "2",
                                     "REVIEW_BELOW_SCORE": "0.9"})
    feedback = str(tmp_path / "feedback")
    try:
        sent = []
        for seed in range(3):  # bluish pictures the model should have called "blue"
            data = ig.encode(ig.noisy((60, 60, 200), (40, 40), seed=seed), "PNG")
            answer = post_image(server, data, content_type="image/png").json()
            sent.append(answer["filename"])
            response = requests.post(server.url + "/feedback", timeout=10, json={
                "filename": answer["filename"], "label": "blue",
                "predicted": answer["predictions"][0]["label"],
                "score": answer["predictions"][0]["score"]})
            assert response.status_code == 201, response.text
            assert response.json()["saved"] == f"feedback/blue/{answer['filename']}"
        grey = post_image(server, ig.png((128, 128, 128)), content_type="image/png").json()
        bad = requests.post(server.url + "/feedback", timeout=10,
                            data={"filename": "../temp/" + sent[0], "label": "blue"})
        assert_envelope(bad, 400, "invalid_filename")
    finally:
        server.stop()
    assert sorted(f for f in files(os.path.join(feedback, "blue"))
                  if f.endswith(".png")) == sorted(sent)
    assert grey["filename"] in files(os.path.join(feedback, REVIEW))

    data_dir = tmp_path / "data"
    for name, colour in {"blue": ig.BLUE, "green": ig.GREEN, "red": ig.RED}.items():
        (data_dir / name).mkdir(parents=True)
        for i in range(10):
            ig.noisy(colour, (40, 40), seed=i, amount=60).save(data_dir / name / f"{i:02d}.png")
    out = tmp_path / "model"
    assert retrain.main(["--image-dir", str(data_dir), "--extra-image-dir", feedback,
                         "--tfhub-module", tiny_module, "--output-dir", str(out),
                         "--how-many-training-steps", "30", "--bottleneck-dir", "",
                         "--runs-log", "", "--no-export", "--quiet"]) == 0
    with open(out / "report.json") as fh:
        report = json.load(fh)
    assert report["extra_images"]["per_class"] == {"blue": 3, "green": 0, "red": 0}
    assert sum(report["images"].values()) == 33  # 30 + 3; _review/ is not a class
    with open(out / "model.json") as fh:
        run = json.load(fh)["run"]
    assert run["data"]["extra_image_dirs"] == [feedback]
    assert run["data"]["splits"]["blue"]["training"] + run["data"]["splits"]["blue"][
        "validation"] + run["data"]["splits"]["blue"]["testing"] == 13
