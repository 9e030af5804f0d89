"""A local Hugging Face Hub for tests: the routes huggingface_hub and ftscript call to create
repos, commit files (inline, through LFS basic and multipart, or through Xet) and download them,
served from a directory on 127.0.0.1.

usage: hub_server.py ROOT [--port 0] [--token TOKEN] [--multipart-threshold BYTES] [--chunk-size BYTES]
                          [--xet-cas URL]

By default the Hub offers only Git LFS. With --xet-cas (the URL of xet-core's `local_cas_server`)
it answers LFS batches that offer `xet` with `transfer: "xet"` (as huggingface.co does), hands
out Xet tokens pointing at that CAS, maps a committed lfsFile's sha256 to the CAS file holding
those bytes (via the server's /simulation routes), and serves such files with `X-Xet-Hash` (and
their bytes from the CAS, for plain GETs). Commit events then say `"via": "xet"`.

Prints `READY http://127.0.0.1:PORT` once listening. Blobs live in ROOT/objects/<sha256>, the
repos' commits in ROOT/repos.json, and every upload/commit event is appended to ROOT/events.jsonl
(also served at GET /_test/events): `{"event": "lfs_upload", "oid", "size", "transfer":
"basic"|"multipart", "parts"}`, `{"event": "commit", "repo", "files": [{"path", "via":
"inline"|"lfs"|"xet", "size", "sha256"}]}`, `{"event": "xet_token", "repo", "kind":
"read"|"write"}`, `{"event": "lfs_batch", "transfer": "xet", ...}` and `{"event":
"xet_file_plain_get", "repo", "path"}` (a Xet file's bytes asked of the Hub instead of the
CAS). POST /_test/fail `{"route": "commit", "status": 503, "count": 2}` makes the next matching
requests fail (routes: create, preupload, batch, upload, part, complete, commit, resolve, info,
tree).

Routes (as the Hub serves them):
  GET  /api/whoami-v2
  POST /api/repos/create                              {name, organization, private|visibility, type}
  POST /api/validate-yaml
  GET  /api/models/{repo}[/revision/{rev}]             id, sha, private, siblings (blobs=1: sizes, lfs)
  GET  /api/models/{repo}/tree/{rev}[/{path}]          ?recursive=1
  POST /api/models/{repo}/branch/{branch}              create a branch from main (or startingPoint)
  POST /api/models/{repo}/preupload/{rev}              uploadMode lfs|regular per file
  POST /{repo}.git/info/lfs/objects/batch              basic or multipart actions
  PUT  /_lfs/upload/{oid}, PUT /_lfs/part/{oid}/{n}, POST /_lfs/complete/{oid}, POST /_lfs/verify
  POST /api/models/{repo}/commit/{rev}                 NDJSON: header, file, lfsFile, deletedFile[, create_pr=1]
  GET|HEAD /{repo}/resolve/{rev}/{path}                ETag, X-Repo-Commit, X-Linked-Etag/-Size, Range
                                                       (+ X-Xet-Hash, Link rel="xet-auth" for Xet files)
  GET  /api/models/{repo}/xet-{read|write}-token/{rev} {accessToken, exp, casUrl} + X-Xet-* headers
"""
import argparse
import base64
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
                  ".npy", ".npz", ".pkl", ".pickle", ".zip", ".tar", ".gz", ".parquet", ".arrow", ".model",
                  ".ot", ".tflite", ".joblib", ".7z", ".bz2", ".xz", ".zst", ".tgz", ".wasm")
LFS_SIZE = 10 * 1024 * 1024


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    def __init__(self, root, token, multipart_threshold, chunk_size, xet_cas=None):
        self.root = root
        self.xet_cas = xet_cas.rstrip("/") if xet_cas else None
        self.token = token
        self.multipart_threshold = multipart_threshold
        self.chunk_size = chunk_size
        self.lock = threading.RLock()
        self.objects = os.path.join(root, "objects")
        os.makedirs(self.objects, exist_ok=True)
        os.makedirs(os.path.join(root, "parts"), exist_ok=True)
        self.state_path = os.path.join(root, "repos.json")
        self.events_path = os.path.join(root, "events.jsonl")
        # repos[repo_id] = {"private": bool, "refs": {name: sha}, "commits": {sha: {"parent", "message", "files"}}}
        # files[path] = {"size", "oid" (git blob sha1), "sha256", "lfs": bool}
        self.repos = json.load(open(self.state_path)) if os.path.exists(self.state_path) else {}
        self.failures = []  # [{"route", "status", "count"}]

    def save(self):
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.repos, f)
        os.replace(tmp, self.state_path)

    def event(self, e):
        with self.lock, open(self.events_path, "a") as f:
            f.write(json.dumps(e) + "\n")

    def object_path(self, sha256):
        return os.path.join(self.objects, sha256)

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not os.path.exists(path):
            tmp = path + "." + uuid.uuid4().hex
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def cas_get(self, path):
        with urllib.request.urlopen(self.xet_cas + path) as r:
            return r.read()

    def xet_file_for(self, sha256, size):
        """The Xet file hash of the CAS file whose bytes have this sha256, or None."""
        for e in json.loads(self.cas_get("/simulation/file_entries")):
            h = e["file_hash"] if isinstance(e, dict) else e[0] if isinstance(e, list) and len(e) == 2 else e
            if isinstance(h, list):
                h = "".join(f"{x:016x}" for x in h)
            if json.loads(self.cas_get(f"/simulation/files/{h}/size"))["size"] != size:
                continue
            if hashlib.sha256(self.cas_get(f"/simulation/files/{h}/data")).hexdigest() == sha256:
                return h
        return None

    def resolve_rev(self, repo, rev):
        rev = unquote(rev)
        if rev in repo["refs"]:
            return repo["refs"][rev]
        if rev in repo["commits"]:
            return rev
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub = None

    def log_message(self, fmt, *args):  # quiet; set HUB_SERVER_VERBOSE=1 to see requests
        if os.environ.get("HUB_SERVER_VERBOSE"):
            sys.stderr.write("hub: " + (fmt % args) + "\n")

    # ---- plumbing ----
    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status, body=b"", headers=None, content_type="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status, message, code=None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self.send(status, {"error": message}, headers)

    def base(self):
        return "http://" + self.headers.get("Host", "127.0.0.1")

    def authorized(self):
        """True if the request carries the server's token (or the server has none)."""
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization", "") == "Bearer " + self.hub.token

    def require_auth(self):
        if not self.authorized():
            self.error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def injected_failure(self, route):
        with self.hub.lock:
            for f in self.hub.failures:
                if f["route"] == route and f["count"] > 0:
                    f["count"] -= 1
                    self.body()
                    self.error(f["status"], f"injected failure on {route}")
                    return True
        return False

    def repo(self, repo_id, write=False):
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo["private"] and not self.authorized()):
            self.error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if write and not self.require_auth():
            return None
        return repo

    def files_at(self, repo_id, rev):
        repo = self.repo(repo_id)
        if repo is None:
            return None, None, None
        sha = self.hub.resolve_rev(repo, rev)
        if sha is None:
            self.error(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
            return None, None, None
        return repo, sha, repo["commits"][sha]["files"]

    # ---- dispatch ----
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", url.path)
        if m:
            if not self.injected_failure("tree"):
                self.tree(unquote(m.group(1)), m.group(2), unquote(m.group(3) or ""), query)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", url.path)
        if m:
            if not self.injected_failure("info"):
                self.info(unquote(m.group(1)), m.group(2) or "main", query)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/xet-(read|write)-token/([^/]+)", url.path)
        if m and self.hub.xet_cas:
            return self.xet_token(unquote(m.group(1)), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
        if m:
            if not self.injected_failure("resolve"):
                self.resolve(unquote(m.group(1)), m.group(2), unquote(m.group(3)))
            return
        if path == "/api/whoami-v2":
            if not self.authorized() or "Authorization" not in self.headers:
                return self.error(401, "Invalid credentials in Authorization header")
            return self.send(200, {"type": "user", "name": "tester", "fullname": "Test User", "orgs": [],
                                   "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})
        if path == "/_test/events":
            events = []
            if os.path.exists(self.hub.events_path):
                events = [json.loads(l) for l in open(self.hub.events_path) if l.strip()]
            return self.send(200, events)
        self.error(404, f"no route for GET {path}")

    def do_PUT(self):
        url = urlsplit(self.path)
        m = re.fullmatch(r"/_lfs/upload/([0-9a-f]{64})", url.path)
        if m:
            if not self.injected_failure("upload"):
                self.lfs_basic(m.group(1))
            return
        m = re.fullmatch(r"/_lfs/part/([0-9a-f]{64})/(\d+)", url.path)
        if m:
            if not self.injected_failure("part"):
                self.lfs_part(m.group(1), int(m.group(2)))
            return
        self.body()
        self.error(404, f"no route for PUT {url.path}")

    def do_POST(self):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        routes = [
            (r"/api/repos/create", "create", lambda m: self.create()),
            (r"/api/validate-yaml", "yaml", lambda m: (self.body(), self.send(200, {"errors": [], "warnings": []}))),
            (r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", "preupload", lambda m: self.preupload(unquote(m.group(1)), m.group(2))),
            (r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", "commit", lambda m: self.commit(unquote(m.group(1)), m.group(2), query)),
            (r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", "branch", lambda m: self.branch(unquote(m.group(1)), unquote(m.group(2)))),
            (r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", "batch", lambda m: self.batch(unquote(m.group(1)))),
            (r"/_lfs/complete/([0-9a-f]{64})", "complete", lambda m: self.lfs_complete(m.group(1))),
            (r"/_lfs/verify", "verify", lambda m: self.lfs_verify()),
            (r"/_test/fail", "fail", lambda m: self.add_failure()),
        ]
        for pattern, route, handler in routes:
            m = re.fullmatch(pattern, url.path)
            if m:
                if not self.injected_failure(route):
                    handler(m)
                return
        self.body()
        self.error(404, f"no route for POST {path}")

    # ---- routes ----
    def add_failure(self):
        f = json.loads(self.body())
        with self.hub.lock:
            self.hub.failures.append({"route": f["route"], "status": int(f.get("status", 503)), "count": int(f.get("count", 1))})
        self.send(200, {})

    def create(self):
        if not self.require_auth():
            self.body()
            return
        p = json.loads(self.body())
        if p.get("type", "model") != "model":
            return self.error(400, "this test hub only serves model repos")
        repo_id = f"{p['organization']}/{p['name']}" if p.get("organization") else f"tester/{p['name']}"
        private = bool(p.get("private")) or p.get("visibility") == "private"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self.send(409, {"error": "You already created this model repo", "url": f"{self.base()}/{repo_id}"},
                                 {"X-Error-Message": "You already created this model repo"})
            sha = hashlib.sha1(f"init {repo_id} {time.time()}".encode()).hexdigest()
            self.hub.repos[repo_id] = {"private": private, "refs": {"main": sha},
                                       "commits": {sha: {"parent": None, "message": "initial commit", "files": {}}}}
            self.hub.save()
        self.send(200, {"url": f"{self.base()}/{repo_id}", "name": repo_id, "id": repo_id})

    def xet_headers(self):
        exp = int(time.time()) + 3600
        return {"X-Xet-Cas-Url": self.hub.xet_cas, "X-Xet-Access-Token": "xet-test-token", "X-Xet-Token-Expiration": str(exp)}, exp

    def xet_token(self, repo_id, kind):
        if self.repo(repo_id, write=(kind == "write")) is None:
            return
        headers, exp = self.xet_headers()
        self.hub.event({"event": "xet_token", "repo": repo_id, "kind": kind})
        self.send(200, {"accessToken": headers["X-Xet-Access-Token"], "exp": exp, "casUrl": self.hub.xet_cas}, headers)

    def info(self, repo_id, rev, query):
        repo, sha, files = self.files_at(repo_id, rev)
        if repo is None:
            return
        siblings = []
        for p, f in sorted(files.items()):
            s = {"rfilename": p}
            if query.get("blobs"):
                s["size"] = f["size"]
                s["blobId"] = f["oid"]
                if f["lfs"]:
                    s["lfs"] = {"sha256": f["sha256"], "size": f["size"], "pointerSize": 134}
            siblings.append(s)
        self.send(200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                        "private": repo["private"], "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                        "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
                        "createdAt": "2026-01-01T00:00:00.000Z", "siblings": siblings})

    def tree(self, repo_id, rev, prefix, query):
        repo, sha, files = self.files_at(repo_id, rev)
        if repo is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = prefix.strip("/")
        out, dirs = [], set()
        for p, f in sorted(files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1:] if prefix else p
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = "/".join(([prefix] if prefix else []) + parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
            if len(parts) > 1 and not recursive:
                continue
            e = {"type": "file", "oid": f["oid"], "size": f["size"], "path": p}
            if f["lfs"]:
                e["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
            if f.get("xet"):
                e["xetHash"] = f["xet"]
            out.append(e)
        self.send(200, out)

    def branch(self, repo_id, branch):
        body = json.loads(self.body() or b"{}")
        repo = self.repo(repo_id, write=True)
        if repo is None:
            return
        with self.hub.lock:
            if branch in repo["refs"]:
                return self.error(409, f"Reference {branch} already exists")
            start = self.hub.resolve_rev(repo, body.get("startingPoint") or "main")
            repo["refs"][branch] = start
            self.hub.save()
        self.send(200, {})

    def preupload(self, repo_id, rev):
        p = json.loads(self.body())
        repo, sha, files = self.files_at(repo_id, rev)
        if repo is None:
            return
        if not self.require_auth():
            return
        out = []
        for f in p["files"]:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].lower().endswith(LFS_EXTENSIONS) or f["size"] >= LFS_SIZE or b"\0" in sample
            existing = files.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": existing["oid"] if existing else None})
        self.send(200, {"files": out, "commitOid": sha})

    def batch(self, repo_id):
        p = json.loads(self.body())
        if self.repo(repo_id, write=True) is None:
            return
        transfers = p.get("transfers", ["basic"])
        if self.hub.xet_cas and "xet" in transfers:
            self.hub.event({"event": "lfs_batch", "repo": repo_id, "transfer": "xet", "oids": [o["oid"] for o in p["objects"]]})
            return self.send(200, {"transfer": "xet", "objects": [{"oid": o["oid"], "size": o["size"]} for o in p["objects"]],
                                   "hash_algo": "sha256"}, content_type="application/vnd.git-lfs+json")
        objects, chosen = [], "basic"
        for o in p["objects"]:
            oid, size = o["oid"], int(o["size"])
            e = {"oid": oid, "size": size}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                e["error"] = {"code": 422, "message": "invalid oid"}
            elif os.path.exists(self.hub.object_path(oid)):
                pass  # already stored: no actions
            elif "multipart" in transfers and size > self.hub.multipart_threshold:
                chosen = "multipart"
                n = -(-size // self.hub.chunk_size)
                header = {"chunk_size": str(self.hub.chunk_size)}
                for i in range(1, n + 1):
                    header[str(i)] = f"{self.base()}/_lfs/part/{oid}/{i}"
                e["actions"] = {"upload": {"href": f"{self.base()}/_lfs/complete/{oid}", "header": header}}
            else:
                e["actions"] = {"upload": {"href": f"{self.base()}/_lfs/upload/{oid}"},
                                "verify": {"href": f"{self.base()}/_lfs/verify"}}
            objects.append(e)
        self.send(200, {"transfer": chosen, "objects": objects, "hash_algo": "sha256"},
                  content_type="application/vnd.git-lfs+json")

    def lfs_basic(self, oid):
        data = self.body()
        if "Authorization" in self.headers:
            # the storage URL is presigned: a client must never send its Hub token there
            self.hub.event({"event": "token_leak", "route": "upload"})
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, "sha256 mismatch")
        self.hub.store(data)
        self.hub.event({"event": "lfs_upload", "oid": oid, "size": len(data), "transfer": "basic", "parts": 1})
        self.send(200, b"", {"ETag": '"' + hashlib.md5(data).hexdigest() + '"'})

    def lfs_part(self, oid, n):
        data = self.body()
        if "Authorization" in self.headers:
            self.hub.event({"event": "token_leak", "route": "part"})
        path = os.path.join(self.hub.root, "parts", f"{oid}.{n}")
        with open(path, "wb") as f:
            f.write(data)
        self.send(200, b"", {"ETag": '"' + hashlib.md5(data).hexdigest() + '"'})

    def lfs_complete(self, oid):
        p = json.loads(self.body())
        parts = sorted(p["parts"], key=lambda x: x["partNumber"])
        if p.get("oid") != oid or [x["partNumber"] for x in parts] != list(range(1, len(parts) + 1)):
            return self.error(400, "bad completion payload")
        data = bytearray()
        for x in parts:
            path = os.path.join(self.hub.root, "parts", f"{oid}.{x['partNumber']}")
            if not os.path.exists(path):
                return self.error(400, f"part {x['partNumber']} missing")
            chunk = open(path, "rb").read()
            if x["etag"].strip('"') != hashlib.md5(chunk).hexdigest():
                return self.error(400, f"part {x['partNumber']}: etag mismatch")
            data += chunk
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, "sha256 mismatch after assembling parts")
        self.hub.store(bytes(data))
        for x in parts:
            os.remove(os.path.join(self.hub.root, "parts", f"{oid}.{x['partNumber']}"))
        self.hub.event({"event": "lfs_upload", "oid": oid, "size": len(data), "transfer": "multipart", "parts": len(parts)})
        self.send(200, {"success": True})

    def lfs_verify(self):
        p = json.loads(self.body())
        path = self.hub.object_path(p["oid"])
        if not os.path.exists(path) or os.path.getsize(path) != int(p["size"]):
            return self.error(404, "object not found")
        self.send(200, {"success": True})

    def commit(self, repo_id, rev, query):
        raw = self.body()
        repo = self.repo(repo_id, write=True)
        if repo is None:
            return
        lines = [json.loads(l) for l in raw.decode().splitlines() if l.strip()]
        if not lines or lines[0].get("key") != "header":
            return self.error(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        create_pr = query.get("create_pr", ["0"])[0] in ("1", "true")
        with self.hub.lock:
            parent = self.hub.resolve_rev(repo, rev)
            if parent is None:
                return self.error(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
            if header.get("parentCommit") and header["parentCommit"] != parent:
                return self.error(412, "parentCommit is not the head of the revision")
            files = dict(repo["commits"][parent]["files"])
            log = []
            for l in lines[1:]:
                key, v = l["key"], l["value"]
                if key == "file":
                    if v.get("encoding", "base64") != "base64":
                        return self.error(400, "only base64 encoding is supported")
                    data = base64.b64decode(v["content"])
                    sha = self.hub.store(data)
                    files[v["path"]] = {"size": len(data), "oid": git_blob_oid(data), "sha256": sha, "lfs": False}
                    log.append({"path": v["path"], "via": "inline", "size": len(data), "sha256": sha})
                elif key == "lfsFile":
                    path = self.hub.object_path(v["oid"])
                    xet = None
                    if not os.path.exists(path) or os.path.getsize(path) != int(v["size"]):
                        xet = self.hub.xet_file_for(v["oid"], int(v["size"])) if self.hub.xet_cas else None
                        if xet is None:
                            return self.error(400, f"LFS object {v['oid']} of {v['path']} was not uploaded")
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{v['oid']}\nsize {v['size']}\n"
                    files[v["path"]] = {"size": int(v["size"]), "oid": git_blob_oid(pointer.encode()),
                                        "sha256": v["oid"], "lfs": True, "xet": xet}
                    log.append({"path": v["path"], "via": "xet" if xet else "lfs", "size": int(v["size"]), "sha256": v["oid"]})
                elif key == "deletedFile":
                    if files.pop(v["path"], None) is None:
                        return self.error(404, f"{v['path']} does not exist", "EntryNotFound")
                    log.append({"path": v["path"], "via": "deleted"})
                elif key == "deletedFolder":
                    prefix = v["path"].rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    return self.error(400, f"unknown NDJSON key {key}")
            sha = hashlib.sha1(json.dumps([parent, header, sorted(files.items()), time.time()]).encode()).hexdigest()
            repo["commits"][sha] = {"parent": parent, "message": header.get("summary", ""), "files": files}
            result = {"success": True, "commitOid": sha, "commitUrl": f"{self.base()}/{repo_id}/commit/{sha}"}
            if create_pr:
                n = 1 + sum(1 for r in repo["refs"] if r.startswith("refs/pr/"))
                repo["refs"][f"refs/pr/{n}"] = sha
                result["pullRequestUrl"] = f"{self.base()}/{repo_id}/discussions/{n}"
            else:
                repo["refs"][unquote(rev)] = sha
            self.hub.save()
        self.hub.event({"event": "commit", "repo": repo_id, "revision": unquote(rev), "create_pr": create_pr,
                        "sha": sha, "message": header.get("summary", ""), "files": log})
        self.send(200, result)

    def resolve(self, repo_id, rev, path):
        repo, sha, files = self.files_at(repo_id, rev)
        if repo is None:
            return
        f = files.get(path)
        if f is None:
            return self.error(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if f["lfs"]:
            headers["ETag"] = f'"{f["sha256"]}"'
            headers["X-Linked-Etag"] = f'"{f["sha256"]}"'
            headers["X-Linked-Size"] = f["size"]
        else:
            headers["ETag"] = f'"{f["oid"]}"'
        if f.get("xet"):
            headers["X-Xet-Hash"] = f["xet"]
            refresh = f"{self.base()}/api/models/{repo_id}/xet-read-token/{sha}"
            headers["Link"] = f'<{refresh}>; rel="xet-auth"'
            headers.update(self.xet_headers()[0])
        size = f["size"]
        status, start, end = 200, 0, size - 1
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                return self.error(416, "bad range")
            if m.group(1) == "":
                start, end = max(0, size - int(m.group(2))), size - 1
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start >= size:
                return self.send(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        data = b""
        if self.command != "HEAD" and f.get("xet"):
            # a client that speaks Xet fetches these bytes from the CAS, not here
            self.hub.event({"event": "xet_file_plain_get", "repo": repo_id, "path": path})
            data = self.hub.cas_get(f"/simulation/files/{f['xet']}/data")[start:end + 1]
        elif self.command != "HEAD":
            with open(self.hub.object_path(f["sha256"]), "rb") as fh:
                fh.seek(start)
                data = fh.read(end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client closed its keep-alive connection
        super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", default=None)
    ap.add_argument("--multipart-threshold", type=int, default=20 * 1024 * 1024)
    ap.add_argument("--chunk-size", type=int, default=8 * 1024 * 1024)
    ap.add_argument("--xet-cas", default=None, help="URL of a local_cas_server: offer Xet transfers")
    a = ap.parse_args()
    os.makedirs(a.root, exist_ok=True)
    Handler.hub = Hub(a.root, a.token, a.multipart_threshold, a.chunk_size, a.xet_cas)
    server = Server(("127.0.0.1", a.port), Handler)
    print(f"READY http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
