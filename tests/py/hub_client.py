"""The real huggingface_hub client against a Hub endpoint (the test server), for tests/hub.rs.

Reads HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE, HF_HUB_OFFLINE from the environment (set by the test).

usage:
  hub_client.py upload REPO DIR [--private]     create_repo + upload_folder; prints the commit oid
  hub_client.py download REPO OUT_JSON          snapshot_download; writes {path: sha256} and the snapshot dir
  hub_client.py load REPO                       AutoModelForCausalLM + AutoTokenizer from the cache (offline)
"""
import hashlib
import json
import os
import sys


def digest_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if rel.startswith(".cache"):
                continue
            with open(p, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def main():
    cmd, repo = sys.argv[1], sys.argv[2]
    if cmd == "upload":
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(repo, private="--private" in sys.argv, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=sys.argv[3], commit_message="upload from python")
        print(info.oid)
    elif cmd == "download":
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo)
        with open(sys.argv[3], "w") as f:
            json.dump({"snapshot": path, "files": digest_tree(path)}, f)
        print(path)
    elif cmd == "load":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(repo)
        tok = AutoTokenizer.from_pretrained(repo)
        ids = tok("The quick brown fox", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(ids).logits
        print(f"loaded {type(model).__name__} logits {tuple(out.shape)}")
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
