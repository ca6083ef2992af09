"""Example HTTP client of `p5ray serve` (stdlib only): every route once, printed as JSON.

    python serve/client_http.py --url http://127.0.0.1:8000 --user 196 --item 50
"""

import argparse
import json
import urllib.error
import urllib.request


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 422 / 404 / 413 / 503 carry {"detail": ...}
        return {"status": exc.code, **json.loads(exc.read() or b"{}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--user", default="196")
    parser.add_argument("--item", default="50")
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    calls = {
        "recommend": {"user_id": args.user, "k": args.k},
        "recall": {"user_id": args.user, "k": args.k},
        "rank": {"user_id": args.user, "candidates": [args.item, "1", "181"]},
        "cross-sell": {"item_ids": [args.item], "k": args.k},
        "rating": {"user_id": args.user, "item_id": args.item},
    }
    for route, body in calls.items():
        print(f"POST /v1/{route} {json.dumps(body)}\n  -> {json.dumps(post(f'{args.url}/v1/{route}', body))}")
    print(f"POST /v1/recommend with k=0\n  -> {json.dumps(post(f'{args.url}/v1/recommend', {'user_id': args.user, 'k': 0}))}")


if __name__ == "__main__":
    main()
