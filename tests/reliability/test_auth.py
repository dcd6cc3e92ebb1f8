"""Access control with MONAI Label's authentication on, against a real token issuer started here
(:class:`tests.support.token_issuer.TokenIssuer`: an OpenID-style realm that publishes its public
key and signs RS256 tokens): requests without a valid token are refused, each role reaches only
what it may, and the 3D Slicer module logs in and keeps working."""

from __future__ import annotations

import json
import sys
import time

import jwt
import numpy as np
import pytest
import requests

from tests.support.server import MonaiLabelServer
from tests.support.token_issuer import ROLE_ADMIN, ROLE_ANNOTATOR, ROLE_USER, TokenIssuer, new_key

from .helpers import TIMEOUT, datastore_objects, make_model_dir, make_studies, rows

pytestmark = pytest.mark.slow

PASSWORDS = {"alice-admin": "admin-secret", "rita-reviewer": "reviewer-secret", "anna-annotator": "annotator-secret",
             "uwe-user": "user-secret", "nora-norole": "norole-secret"}
#: the roles each user holds (composite, as in a Keycloak realm)
RANK = {"alice-admin": 4, "rita-reviewer": 3, "anna-annotator": 2, "uwe-user": 1, "nora-norole": 0}
NEEDS = {"user": 1, "annotator": 2, "admin": 4}


@pytest.fixture(scope="module")
def issuer():
    with TokenIssuer() as iss:
        yield iss


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_model, issuer):
    root = tmp_path_factory.mktemp("auth_server")
    studies = make_studies(root, rows(2, 2, offset=40), rows(1, 1, offset=44))
    srv = MonaiLabelServer(studies, make_model_dir(root, small_model), env=issuer.env(), log_path=root / "server.log")
    srv.start()
    srv.root = root
    yield srv
    srv.stop()


def login(server, username: str, password: str) -> requests.Response:
    return requests.post(f"{server.url}/auth/token", data={"username": username, "password": password,
                                                           "grant_type": "password"}, timeout=TIMEOUT)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def tokens(server) -> dict:
    out = {}
    for user, password in PASSWORDS.items():
        r = login(server, user, password)
        assert r.status_code == 200, r.text
        out[user] = r.json()["access_token"]
    return out


def frame_bytes(server) -> bytes:
    return next(server.studies.glob("*.png")).read_bytes()


# ------------------------------------------------------------------------------ no token
def test_auth_is_announced(server, issuer):
    info = requests.get(f"{server.url}/auth/", timeout=TIMEOUT).json()
    assert info["enabled"] is True and info["realm"] == issuer.realm_uri


def test_login_with_a_wrong_password_is_a_401_not_a_crash(server):
    for user, password in [("uwe-user", "wrong"), ("nobody", "x"), ("", "")]:
        r = login(server, user, password)
        assert r.status_code in (401, 422), r.text
        assert r.json()["detail"]


def _hs256(claims: dict, secret: bytes) -> str:
    """A token signed with HMAC-SHA256 (PyJWT itself refuses a PEM key as an HMAC secret)."""
    import hashlib
    import hmac

    from jwt.utils import base64url_encode

    head = base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).decode()
    body = base64url_encode(json.dumps(claims).encode()).decode()
    sig = base64url_encode(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()).decode()
    return f"{head}.{body}.{sig}"


BAD_TOKENS = ["garbage", "signed by another key", "expired", "no expiry", "alg none", "hs256 with the public key",
              "tampered roles", "empty"]


def bad_token(issuer, what: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from jwt.utils import base64url_encode

    claims = {"preferred_username": "mallory", "realm_access": {"roles": [ROLE_ADMIN, ROLE_ANNOTATOR, ROLE_USER]},
              "exp": int(time.time()) + 300}
    if what == "garbage":
        return "not-a-token"
    if what == "signed by another key":
        return issuer.token("alice-admin", key=new_key())
    if what == "expired":
        return issuer.token("alice-admin", lifetime=-60)
    if what == "no expiry":
        return issuer.token("alice-admin", exp=None)
    if what == "alg none":
        return jwt.encode(claims, None, algorithm="none")
    if what == "hs256 with the public key":  # the classic RS256 -> HS256 confusion
        pem = issuer.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        return _hs256(claims, pem)
    if what == "tampered roles":  # a user's real token with the roles of an admin pasted in
        head, _, sig = issuer.token("uwe-user").split(".")
        return f"{head}.{base64url_encode(json.dumps(claims).encode()).decode()}.{sig}"
    return ""


CALLS = {
    "info": ("get", "/info/", {}, "user"),
    "classify": ("post", "/infer/classify_nodule", {"params": {"output": "json"}}, "user"),
    "list datastore": ("get", "/datastore/", {"params": {"output": "all"}}, "user"),
    "image info": ("get", "/datastore/image/info", {"params": {"image": "IMAGE"}}, "user"),
    "download image": ("get", "/datastore/image", {"params": {"image": "IMAGE"}}, "user"),
    "next case": ("post", "/activelearning/uncertain", {"json": {}}, "user"),
    "train status": ("get", "/train/", {}, "user"),
    "add image": ("put", "/datastore/image", {"params": {"image": "auth_upload"}}, "annotator"),
    "save label": ("put", "/datastore/label", {"params": {"image": "IMAGE", "tag": "final"}}, "annotator"),
    "confirm diagnosis": ("put", "/datastore/image/info", {"params": {"image": "IMAGE"}}, "annotator"),
    "download dataset": ("get", "/datastore/dataset", {}, "annotator"),
    "train": ("post", "/train/not_this_model", {"json": {"max_epochs": 1}}, "admin"),
    "stop training": ("delete", "/train/", {}, "admin"),
    "batch": ("post", "/batch/infer/classify_nodule", {"params": {"run_sync": "true"}, "json": {"images": ["none"]}},
              "admin"),
    "delete image": ("delete", "/datastore/image", {"params": {"id": "no_such_image"}}, "admin"),
    "delete label": ("delete", "/datastore/label", {"params": {"id": "no_such_image", "tag": "final"}}, "admin"),
    "upload model": ("put", "/model/classify_nodule", {}, "admin"),
    "delete model": ("delete", "/model/classify_nodule", {}, "admin"),
    "model info": ("get", "/model/info/classify_nodule", {}, "admin"),
    "logs": ("get", "/logs/", {"params": {"lines": 5, "text": "true"}}, "admin"),
}


def call(server, name: str, headers: dict) -> requests.Response:
    method, path, kwargs, _ = CALLS[name]
    kwargs = json.loads(json.dumps(kwargs))
    image = sorted(json.loads((server.studies / "datastore_v2.json").read_text())["objects"])[0]
    for key in ("params",):
        if key in kwargs:
            kwargs[key] = {k: (image if v == "IMAGE" else v) for k, v in kwargs[key].items()}
    data = frame_bytes(server)
    if name in ("classify", "add image"):
        kwargs["files"] = {"file": ("f.png", data)}
    elif name == "save label":
        kwargs["files"] = {"label": ("m.png", data)}
        kwargs["data"] = {"params": json.dumps({"note": "auth test"})}
    elif name == "confirm diagnosis":
        kwargs["data"] = {"info": json.dumps({"note": "auth test"})}
    elif name == "upload model":
        kwargs["files"] = {"file": ("m.pt", b"not a model")}
    return getattr(requests, method)(server.url + path, headers=headers, timeout=TIMEOUT, **kwargs)


@pytest.mark.parametrize("what", ["no header", *BAD_TOKENS])
def test_requests_without_a_valid_token_are_refused(server, issuer, what):
    token = None if what == "no header" else bad_token(issuer, what)
    headers = {} if token is None else bearer(token)
    before = datastore_objects(server.url, headers=bearer(issuer.token("alice-admin")))
    for name in CALLS:
        r = call(server, name, headers)
        assert r.status_code == 401, (what, name, r.status_code, r.text[:200])
        assert r.json()["detail"]
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert datastore_objects(server.url, headers=bearer(issuer.token("alice-admin"))) == before


@pytest.mark.parametrize("user", list(PASSWORDS))
def test_each_role_reaches_only_what_it_may(server, tokens, user):
    for name, (_, _, _, needs) in CALLS.items():
        r = call(server, name, bearer(tokens[user]))
        if RANK[user] >= NEEDS[needs]:
            assert r.status_code not in (401, 403) and r.status_code < 500, (user, name, r.status_code, r.text[:200])
        else:
            assert r.status_code == 403, (user, name, r.status_code, r.text[:200])
            assert "is required" in r.json()["detail"], r.text
    # what the allowed calls did is what they should (an admin's model upload was a bad file)
    if user == "alice-admin":
        assert call(server, "upload model", bearer(tokens[user])).status_code == 422


def test_a_plain_user_cannot_change_anything(server, tokens, issuer):
    admin = bearer(issuer.token("alice-admin"))
    before = datastore_objects(server.url, headers=admin)
    model_files = sorted(p.name for p in server.model_dir.iterdir())
    user = bearer(tokens["uwe-user"])
    image = sorted(before)[0]
    for method, path, kwargs in [
        ("post", "/train/classify_nodule", {"json": {"max_epochs": 1}}),
        ("delete", "/datastore/image", {"params": {"id": image}}),
        ("delete", "/datastore/label", {"params": {"id": image, "tag": "final"}}),
        ("put", "/model/classify_nodule", {"files": {"file": ("m.pt", (server.model_dir / "pretrained_classify_nodule.pt")
                                                              .read_bytes())}}),
        ("delete", "/model/classify_nodule", {}),
        ("put", "/datastore/image/info", {"params": {"image": image}, "data": {"info": json.dumps({"diagnosis": "benign"})}}),
        # nor through an inference whose params ask for the result to be saved as a label
        ("post", "/infer/classify_nodule", {"params": {"image": image, "output": "json"},
                                            "data": {"params": json.dumps({"save_label": True, "label_tag": "final"})}}),
    ]:
        r = getattr(requests, method)(server.url + path, headers=user, timeout=TIMEOUT, **kwargs)
        assert r.status_code in (403, 422), (path, r.status_code, r.text[:200])
    assert datastore_objects(server.url, headers=admin) == before
    assert sorted(p.name for p in server.model_dir.iterdir()) == model_files
    train = requests.get(f"{server.url}/train/", headers=admin, timeout=TIMEOUT)
    assert train.status_code == 404 or train.json().get("status") != "RUNNING"


def test_login_service_down_is_a_503_and_issued_tokens_keep_working(server, issuer, tokens):
    issuer.stop()
    try:
        r = login(server, "uwe-user", "user-secret")
        assert r.status_code == 503 and "login service" in r.json()["detail"], r.text
        # the realm's key was fetched already: tokens issued before still work
        r = requests.get(f"{server.url}/info/", headers=bearer(tokens["uwe-user"]), timeout=TIMEOUT)
        assert r.status_code == 200
    finally:
        issuer.start()
    assert login(server, "uwe-user", "user-secret").status_code == 200


# --------------------------------------------------------------------- the 3D Slicer module
@pytest.fixture
def slicer_lib():
    from tests.slicer.helpers import MODULE_DIR

    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))


def test_slicer_module_logs_in_classifies_and_confirms(server, issuer, slicer_lib):
    from pathlib import Path

    from PIL import Image
    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.errors import AuthenticationError

    from tests.slicer.helpers import load_like_slicer, new_scene

    scene = new_scene()
    frame = rows(1, 0, offset=46)[0]
    volume = load_like_slicer(scene, Path(frame["file"]))

    # without credentials, and with a wrong password: a clear message, no crash
    logic = NoduleLogic(scene)
    logic.connect(server.url)
    with pytest.raises(AuthenticationError) as e:
        logic.classify(volume)
    assert "login" in str(e.value)
    logic.connect(server.url, "uwe-user", "wrong")
    with pytest.raises(AuthenticationError) as e:
        logic.test_connection()
    assert "user name and password" in str(e.value)

    # a plain user: logs in, classifies, may not confirm
    logic.connect(server.url, "uwe-user", "user-secret")
    report = logic.test_connection()
    assert report.auth is True and report.model.startswith("sha256:")
    c = logic.classify(volume)
    assert c.label in ("benign", "malignant") and c.model == report.model
    with pytest.raises(AuthenticationError) as e:
        logic.confirm(volume, "benign")
    assert "not allowed" in str(e.value)

    # an annotator confirms; the token expires and the module logs in again by itself
    issuer.lifetime = 3
    try:
        logic.connect(server.url, "anna-annotator", "annotator-secret")
        logic.test_connection()
        requests_before = issuer.token_requests
        time.sleep(4)
        image_id = logic.confirm(volume, "malignant")
        assert issuer.token_requests > requests_before
    finally:
        issuer.lifetime = 300
    assert logic.client.image_info(image_id)["diagnosis"] == "malignant"
    gray = np.asarray(Image.open(frame["file"]).convert("L"))
    assert c.result["image"]["size"] == [gray.shape[1], gray.shape[0]]
    scene.Clear(1)
