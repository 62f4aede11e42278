"""Attachments and images from server.data_dir, in the Go daemon's handoff
format: `{ref}` placeholders, each provider's own parts, deletion after
reading, and every bad path refused with 400 without reading anything
outside data_dir (real files, real symlinks, a FIFO; fds counted)."""
import base64
import json
import os

import pytest

from conftest import client
from test_backends import settings, stream, upstream  # noqa: F401  (fixture)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24  # (the bytes are not looked at, only their type)
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
B64_PNG, B64_PDF = base64.b64encode(PNG).decode(), base64.b64encode(PDF).decode()


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "note.txt").write_text("the note's text")
    (d / "pic.png").write_bytes(PNG)
    (d / "doc.pdf").write_bytes(PDF)
    return d


def with_dir(name, up, data_dir, **extra):
    out = settings(name, up, server__data_dir=str(data_dir)) if up else {"server__data_dir": str(data_dir)}
    out.update(extra)
    return out


ATTACH = {"prompt": "Read {note}, look at {pic}, keep {unknown} as it is.",
          "attachments": {"note": "note.txt", "pic": "pic.png", "extra": "doc.pdf"}}


def test_openai_parts(daemon, upstream, data_dir, fdcheck):  # noqa: F811
    up = upstream()
    ip = daemon(**with_dir("openai", up, data_dir))
    c = stream(ip, ATTACH)
    assert c.data.endswith(b"data: [DONE]\n\n")
    assert up.last().body["messages"][-1]["content"] == [
        {"type": "file", "file": {"filename": "doc.pdf", "file_data": "data:application/pdf;base64," + B64_PDF}},
        {"type": "text", "text": "Read the note's text, look at "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64_PNG}},
        {"type": "text", "text": ", keep {unknown} as it is."}]
    assert sorted(os.listdir(data_dir)) == []  # each file deleted once read
    assert ip.d.helpers is not None  # (read on a helper thread, not on the loop)
    c.close()
    ip.finish(fdcheck, up)


def test_anthropic_blocks(daemon, upstream, data_dir):  # noqa: F811
    up = upstream()
    ip = daemon(**with_dir("anthropic", up, data_dir))
    stream(ip, ATTACH)
    assert up.last().body["messages"][-1]["content"] == [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": B64_PDF}},
        {"type": "text", "text": "Read the note's text, look at "},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64_PNG}},
        {"type": "text", "text": ", keep {unknown} as it is."}]


def test_gemini_inline_data(daemon, upstream, data_dir):  # noqa: F811
    up = upstream()
    ip = daemon(**with_dir("gemini", up, data_dir))
    stream(ip, ATTACH)
    assert up.last().body["contents"][-1]["parts"] == [
        {"inlineData": {"mimeType": "application/pdf", "data": B64_PDF}},
        {"text": "Read the note's text, look at "},
        {"inlineData": {"mimeType": "image/png", "data": B64_PNG}},
        {"text": ", keep {unknown} as it is."}]


def test_langgraph_content_formats(daemon, upstream, data_dir):  # noqa: F811
    up = upstream()
    ip = daemon(**with_dir("langgraph", up, data_dir))
    c = stream(ip, ATTACH)  # openai-style parts have no PDF: 400, naming the type
    assert c.parsed().status == 400 and b"application/pdf attachment needs content_format anthropic" in c.parsed().body
    (data_dir / "pic.png").write_bytes(PNG)
    stream(ip, {"prompt": "See {pic}", "attachments": {"pic": "pic.png"}})
    assert up.last().body["input"]["messages"][-1]["content"] == [
        {"type": "text", "text": "See "}, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64_PNG}}]
    ip2 = daemon(**with_dir("langgraph", up, data_dir, backend__langgraph__content_format="anthropic",
                            server__socket_path=str(data_dir.parent / "d2.sock")))
    (data_dir / "doc.pdf").write_bytes(PDF)
    stream(ip2, {"prompt": "Read {d}", "attachments": {"d": "doc.pdf"}})
    assert up.last().body["input"]["messages"][-1]["content"] == [
        {"type": "text", "text": "Read "},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": B64_PDF}}]


def test_text_only_attachments_keep_the_content_a_string(daemon, upstream, data_dir):  # noqa: F811
    (data_dir / "a.md").write_text("# A")
    (data_dir / "x.dat").write_text('{"k": 1}')
    up = upstream()
    ip = daemon(**with_dir("openai", up, data_dir))
    stream(ip, {"prompt": "{a} and {note}", "attachments": {"note": "note.txt", "a": "a.md", "data": "x.dat"},
                "attachment_types": {"data": "application/json"}})
    assert up.last().body["messages"][-1]["content"] == '{"k": 1}# A and the note\'s text'


def test_messages_get_the_attachments_in_their_last_user_message(daemon, upstream, data_dir):  # noqa: F811
    up = upstream()
    ip = daemon(**with_dir("openai", up, data_dir))
    stream(ip, {"messages": [{"role": "user", "content": "first {note}"}, {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "now {note}"}], "attachments": {"note": "note.txt"}})
    sent = up.last().body["messages"]
    assert sent[0]["content"] == "first {note}" and sent[2]["content"] == "now the note's text"


def test_inline_images_and_the_go_daemons_older_image_fields(daemon, upstream, data_dir):  # noqa: F811
    up = upstream()
    ip = daemon(**with_dir("openai", up, data_dir))
    stream(ip, {"prompt": "what?", "images": [{"base64": B64_PNG, "mime_type": "image/png"}],
                "image_paths": ["pic.png"], "image_base64": B64_PNG})
    assert up.last().body["messages"][-1]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64_PNG}},  # image_paths[0]
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64_PNG}},  # images[0]
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + B64_PNG}},  # image_base64 (jpeg default)
        {"type": "text", "text": "what?"}]
    assert not (data_dir / "pic.png").exists()


def test_the_mock_deletes_the_files_too(daemon, data_dir, fdcheck):
    ip = daemon(server__data_dir=str(data_dir), backend__mock__message_delay=0.0)
    c = client(ip.path, ATTACH)
    ip.pump(c.done)
    assert c.data.endswith(b"data: [DONE]\n\n") and os.listdir(data_dir) == []
    c.close()
    ip.finish(fdcheck)


def bad_case(data_dir, tmp_path, case):
    """Set up one bad-path class; return (attachments, types, the expected reason)."""
    outside = tmp_path / "secret.txt"
    outside.write_text("SECRET OUTSIDE")
    if case == "dotdot":
        return {"a": "../secret.txt"}, None, b"no '..', not absolute"
    if case == "absolute":
        return {"a": str(outside)}, None, b"no '..', not absolute"
    if case == "symlink_out":
        (data_dir / "link.txt").symlink_to(outside)
        return {"a": "link.txt"}, None, b"a symlink"
    if case == "symlink_dir":
        (data_dir / "sub").symlink_to(tmp_path)
        return {"a": "sub/secret.txt"}, None, b"a symlink or not a directory on the way"
    if case == "missing":
        return {"a": "nope.txt"}, None, b"not found"
    if case == "unknown_type":
        (data_dir / "x.exe").write_bytes(b"MZ")
        return {"a": "x.exe"}, None, b"unknown type"
    if case == "unsupported_type":
        (data_dir / "x.bin").write_bytes(b"\0")
        return {"a": "x.bin"}, {"a": "application/octet-stream"}, b"unsupported type 'application/octet-stream'"
    if case == "too_big":
        (data_dir / "big.png").write_bytes(b"\0" * 2000)
        return {"a": "big.png"}, None, b"2000 bytes, over the limit of 1000"
    if case == "too_big_together":
        for n in ("one", "two"):
            (data_dir / (n + ".png")).write_bytes(b"\0" * 800)
        return {"a": "one.png", "b": "two.png"}, None, b"attachment 'b': 800 bytes, over the limit of 700"
    if case == "not_utf8":
        (data_dir / "latin.txt").write_bytes(b"caf\xe9")
        return {"a": "latin.txt"}, None, b"not valid UTF-8 text"
    if case == "directory":
        (data_dir / "d.txt").mkdir()
        return {"a": "d.txt"}, None, b"not a regular file"
    if case == "fifo":
        os.mkfifo(data_dir / "f.txt")
        return {"a": "f.txt"}, None, b"not a regular file"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_out", "symlink_dir", "missing", "unknown_type",
                                  "unsupported_type", "too_big", "too_big_together", "not_utf8", "directory", "fifo"])
def test_every_bad_path_is_400_naming_the_ref_and_reads_nothing_outside(daemon, upstream, data_dir, tmp_path,  # noqa: F811
                                                                        fdcheck, case):
    up = upstream()
    ip = daemon(**with_dir("openai", up, data_dir, server__max_attachment_bytes=1000,
                           server__max_attachments_bytes=1500))
    attachments, types, reason = bad_case(data_dir, tmp_path, case)
    data = {"prompt": "{a}", "attachments": attachments}
    if types:
        data["attachment_types"] = types
    c = client(ip.path, data)
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 400 and b"attachment '" in r.body and reason in r.body, r.body
    assert not up.requests  # nothing went upstream
    assert (tmp_path / "secret.txt").read_text() == "SECRET OUTSIDE"  # untouched
    c.close()
    ip.finish(fdcheck, up)
    assert ip.d.stats.backend_errors == {}  # the request's fault, not the backend's


@pytest.mark.parametrize("data, message", [
    ({"attachments": ["note.txt"]}, b"attachments: expected an object of strings"),
    ({"attachments": {"a b": "note.txt"}}, b"ref 'a b' is not a name"),
    ({"images": [{"base64": "not base64!", "mime_type": "image/png"}]}, b"images[0]: expected"),
    ({"images": [{"base64": B64_PNG, "mime_type": "image/tiff"}]}, b"unsupported image type 'image/tiff'"),
    ({"image_paths": "pic.png"}, b"image_paths: expected a list"),
])
def test_bad_attachment_fields_are_400(daemon, data_dir, fdcheck, data, message):
    ip = daemon(server__data_dir=str(data_dir))
    c = client(ip.path, data)
    ip.pump(c.done)
    assert c.parsed().status == 400 and message in c.parsed().body, c.parsed().body
    c.close()
    ip.finish(fdcheck)


def wait_gone(ip, path):
    ip.pump(lambda: not path.exists())  # (discarded on a helper thread)


@pytest.mark.parametrize("why", ["unknown_backend", "capacity", "another_ref_fails"])
def test_files_of_a_refused_handoff_are_discarded(daemon, data_dir, fdcheck, why):
    """A handoff refused before its backend starts, or whose other attachment
    fails, must not leave its files in data_dir (they pile up on a tmpfs)."""
    extra = {"server__max_connections": 1} if why == "capacity" else {}
    ip = daemon(server__data_dir=str(data_dir), backend__mock__message_delay=30.0, **extra)
    held = client(ip.path, b"\0") if why == "capacity" else None
    if held:
        ip.pump(lambda: held.has(b"Hello"))
    data = {"prompt": "{note}", "attachments": {"note": "note.txt"}}
    if why == "unknown_backend":
        data["backend"] = "nope"
    if why == "another_ref_fails":
        data["attachments"] = {"missing": "missing.txt", "note": "note.txt"}
    c = client(ip.path, data)
    ip.pump(c.done)
    assert c.parsed().status == {"unknown_backend": 400, "capacity": 503, "another_ref_fails": 400}[why]
    c.close()
    wait_gone(ip, data_dir / "note.txt")
    if held:
        held.close()
    ip.finish(fdcheck)


def test_the_direct_front_cannot_name_files_in_data_dir(daemon, data_dir, fdcheck):
    """data_dir holds PHP's files for handoffs (another user's, maybe): a client
    of the front may send images inline, never read or delete a file there."""
    from test_front import front, exchange, post, error_of
    ip = front(daemon, server__data_dir=str(data_dir))
    status, _, body = exchange(ip, post({"prompt": "{n}", "attachments": {"n": "note.txt"}}))
    assert status == 400 and "files in data_dir can only be named by a handoff" in error_of(body)["message"]
    assert (data_dir / "note.txt").read_text() == "the note's text"  # neither read nor deleted
    status, _, body = exchange(ip, post({"prompt": "x", "images": [{"base64": B64_PNG, "mime_type": "image/png"}]}))
    assert status == 200
    ip.finish(fdcheck)


@pytest.mark.parametrize("name", ["x\u0000.txt", "c\ud800.txt", "a" * 5000 + ".txt"], ids=["nul", "surrogate", "long"])
def test_file_names_that_cannot_be_paths_are_400(daemon, data_dir, fdcheck, name):
    ip = daemon(server__data_dir=str(data_dir))
    c = client(ip.path, ('{"attachments": {"a": %s}}' % json.dumps(name)).encode())
    ip.pump(c.done)
    assert c.parsed().status == 400 and not ip.d.stats.internal_errors
    c.close()
    ip.finish(fdcheck)


def test_placeholders_of_one_attachment_are_filled_once(daemon, upstream, data_dir):  # noqa: F811
    """A prompt of many {doc} must not turn a 1 MiB file into many copies on the loop."""
    (data_dir / "doc.txt").write_text("D" * 100_000)
    up = upstream()
    ip = daemon(**with_dir("openai", up, data_dir))
    stream(ip, {"prompt": "{doc} " * 3000, "attachments": {"doc": "doc.txt"}})
    content = up.last().body["messages"][-1]["content"]
    assert content.count("D" * 100_000) == 1 and content.count("{doc}") == 2999


def test_a_hard_link_is_refused(daemon, data_dir, tmp_path, fdcheck):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("ELSEWHERE")
    os.link(outside, data_dir / "linked.txt")
    ip = daemon(server__data_dir=str(data_dir))
    c = client(ip.path, {"prompt": "{a}", "attachments": {"a": "linked.txt"}})
    ip.pump(c.done)
    assert c.parsed().status == 400 and b"more than one link" in c.parsed().body
    assert outside.read_text() == "ELSEWHERE"
    c.close()
    ip.finish(fdcheck)
