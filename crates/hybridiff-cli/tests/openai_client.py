"""The official `openai` client against `hybridiff serve` (run by tests/serve.rs).

Usage: python openai_client.py BASE_URL API_KEY
Prints one JSON line with what it saw.
"""
import base64
import json
import struct
import sys
import urllib.request

import openai
from openai import OpenAI


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    return [w, h]


base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
out = {"openai_version": openai.__version__}
out["models"] = [m.id for m in client.models.list().data]

img = client.images.generate(
    model="hybridiff-default",
    prompt="a red circle on a white background",
    n=1,
    size="64x64",
    response_format="b64_json",
    extra_body={"seed": 3, "num_inference_steps": 8},
)
out["b64_size"] = png_size(base64.b64decode(img.data[0].b64_json))
out["revised_prompt"] = img.data[0].revised_prompt

img = client.images.generate(
    prompt="a blue square on a white background",
    size="64x64",
    response_format="url",
    extra_body={"num_inference_steps": 4},
)
req = urllib.request.Request(img.data[0].url, headers={"Authorization": f"Bearer {key}"})
with urllib.request.urlopen(req) as r:
    out["url_size"] = png_size(r.read())

try:
    OpenAI(base_url=base, api_key="wrong", max_retries=0).images.generate(prompt="x")
except openai.AuthenticationError as e:
    out["auth_error"] = e.status_code

try:
    client.images.generate(prompt="x", size="65x64")
except openai.BadRequestError as e:
    out["bad_request_param"] = e.body.get("param") if isinstance(e.body, dict) else None

print(json.dumps(out))
