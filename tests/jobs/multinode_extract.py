"""Run by test_cluster.py in its own process: extraction on a head + two worker nodes."""

import json
import sys

import ray
import ray.data
from ray.cluster_utils import Cluster

from crossray.config import LaunchConfig
from crossray.corpus import CorpusConfig
from crossray.extract import ExtractConfig, Manifest
from jobs.extract import run_extract


def main(family: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = ExtractConfig(family=family, revisions=("step0", "step1000"), layer=1,
                        corpus=CorpusConfig(source=f"{family}/corpus/train.jsonl", seq_len=32,
                                            n_sequences=64), shard_sequences=4, norm_sequences=8)
    # both actors up before the first shard: a fast toy extraction is otherwise done by whichever
    # actor started first, on one node
    ray.data.DataContext.get_current().wait_for_min_actors_s = 120
    manifest = run_extract(cfg, out, LaunchConfig(actors=2, cpus_per_actor=0.5), spread=True)
    nodes = sorted({s["node"] for s in Manifest.read(out).shards})
    print(json.dumps({"nodes": nodes, "shards": len(manifest.shards), "worker_nodes": [
        n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU", 0) > 0]}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
