"""Example gRPC client of `p5ray serve`: every RPC once, on the combined application.

    python serve/client_grpc.py --target 127.0.0.1:9000 --user 196 --item 50
    python serve/client_grpc.py --app recall      # a per-task application answers its own RPC only

Stubs come from p5ray/proto (generated from serve/p5ray.proto by serve/gen_proto.py).
"""

import argparse

import grpc
from google.protobuf import json_format

from p5ray.proto import p5ray_pb2 as pb
from p5ray.proto import p5ray_pb2_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:9000")
    parser.add_argument("--app", default="p5ray", help="Serve application (gRPC metadata `application`)")
    parser.add_argument("--user", default="196")
    parser.add_argument("--item", default="50")
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    stub = p5ray_pb2_grpc.RecommenderStub(grpc.insecure_channel(args.target))
    metadata = (("application", args.app),)
    calls = [
        ("Recommend", pb.RecommendRequest(user_id=args.user, k=args.k)),
        ("Recall", pb.RecallRequest(user_id=args.user, k=args.k)),
        ("Rank", pb.RankRequest(user_id=args.user, candidates=[args.item, "1", "181"])),
        ("CrossSell", pb.CrossSellRequest(item_ids=[args.item], k=args.k)),
        ("PredictRating", pb.RatingRequest(user_id=args.user, item_id=args.item)),
        ("Recommend", pb.RecommendRequest(user_id=args.user, k=0)),  # INVALID_ARGUMENT
    ]
    for method, request in calls:
        try:
            reply = getattr(stub, method)(request, metadata=metadata, timeout=30)
            print(f"{method}: {json_format.MessageToJson(reply, indent=None, preserving_proto_field_name=True)}")
        except grpc.RpcError as exc:
            print(f"{method}: {exc.code().name}: {exc.details()}")


if __name__ == "__main__":
    main()
