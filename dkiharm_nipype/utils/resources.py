"""Per-node resource requests for Nipype's batch (cluster) plugins.

MultiProc schedules each node with its ``n_procs`` and ``mem_gb``; Nipype's batch plugins do
not: every job is submitted with the same ``sbatch_args``/``qsub_args``. :func:`node_batch_args`
turns a node's ``n_procs`` and ``mem_gb`` into that node's own scheduler arguments (Slurm's
``--cpus-per-task``/``--mem``, PBS/Torque's ``-l nodes=1:ppn``/``-l mem``) and adds the
user's GPU request (``--gpu-plugin-args``) to the nodes that can use a GPU;
:func:`apply_batch_resources` writes them into ``node.plugin_args``, which the plugins read
per node and append to the workflow-wide arguments.

A node *can use a GPU* when its interface takes a torch ``device`` input (training,
inference, torch denoising): the ``device`` input is the tag, so a new torch interface is
covered as soon as it accepts a device. (The command line refuses ``--gpu-plugin-args``
with ``--device cpu``, which would ask the cluster for GPUs no node uses.)
"""

from __future__ import annotations

import math
import re
from typing import Any

#: Memory (GB) a batch job needs on top of the node's own estimate: the Python interpreter
#: that unpickles and runs the node (measured 0.25 GB RSS after importing dkiharm's
#: interfaces, torch included).
JOB_OVERHEAD_GB = 0.5

#: Per-node argument key of each batch plugin (Nipype appends it to the global one).
ARGS_KEY = {
    "SLURM": "sbatch_args",
    "SLURMGraph": "sbatch_args",
    "PBS": "qsub_args",
    "PBSGraph": "qsub_args",
    "SGE": "qsub_args",
    "SGEGraph": "qsub_args",
    "LSF": "bsub_args",
}

#: Options that already fix the CPUs / memory of every job when found in the global args.
_CPU_FLAGS = {"SLURM": r"(^|\s)(-c|--cpus-per-task)[\s=]", "PBS": r"ppn="}
_MEM_FLAGS = {"SLURM": r"(^|\s)--mem(-per-cpu|-per-gpu)?[\s=]", "PBS": r"(^|[\s,])mem="}


def can_use_gpu(node: Any) -> bool:
    """Whether ``node`` runs torch code that a GPU speeds up (its interface takes ``device``)."""
    inputs = getattr(getattr(node, "interface", None), "inputs", None)
    return inputs is not None and "device" in inputs.copyable_trait_names()


def node_batch_args(
    plugin: str, n_procs: int, mem_gb: float | None, gpu: str = "", global_args: str = ""
) -> str:
    """The scheduler arguments of one node: its CPUs and memory, then ``gpu`` when given.

    CPUs or memory already fixed in ``global_args`` (the user's ``sbatch_args``/``qsub_args``)
    are left to them. SGE and LSF express slots and memory through site-specific parallel
    environments and units, so they get only ``gpu``.

    >>> node_batch_args("SLURM", 3, 0.3, "--gres=gpu:1")
    '--cpus-per-task=3 --mem=820M --gres=gpu:1'
    >>> node_batch_args("SLURM", 2, 4, global_args="-p short --mem 8G")
    '--cpus-per-task=2'
    >>> node_batch_args("PBS", 4, 2.0)
    '-l nodes=1:ppn=4 -l mem=2560mb'
    """
    family = plugin.replace("Graph", "")
    mem_mb = math.ceil(((mem_gb or 0.0) + JOB_OVERHEAD_GB) * 1024)
    cpus = max(1, int(n_procs or 1))
    parts = []
    if family in _CPU_FLAGS and not re.search(_CPU_FLAGS[family], global_args):
        parts.append(f"--cpus-per-task={cpus}" if family == "SLURM" else f"-l nodes=1:ppn={cpus}")
    if family in _MEM_FLAGS and not re.search(_MEM_FLAGS[family], global_args):
        parts.append(f"--mem={mem_mb}M" if family == "SLURM" else f"-l mem={mem_mb}mb")
    if gpu.strip():
        parts.append(gpu.strip())
    return " ".join(parts)


def apply_batch_resources(
    workflow: Any, plugin: str, plugin_args: dict[str, Any], gpu_args: str = ""
) -> list[tuple[Any, str]]:
    """Set every node's ``plugin_args`` for a batch ``plugin``; returns ``[(node, args)]``.

    Nothing changes for local plugins (MultiProc, Linear), which schedule with ``n_procs``
    and ``mem_gb`` themselves. A node's ``plugin_args`` already set by a workflow factory
    are kept (they win).
    """
    key = ARGS_KEY.get(plugin)
    if key is None:
        return []
    global_args = str(plugin_args.get(key, ""))
    applied = []
    for node in workflow._get_all_nodes():
        if key in (node.plugin_args or {}):
            continue
        gpu = gpu_args if can_use_gpu(node) else ""
        args = node_batch_args(plugin, node.n_procs, node.mem_gb, gpu, global_args)
        if args:
            # graph plugins concatenate global and node args without a separator
            node.plugin_args = {**(node.plugin_args or {}), key: " " + args}
            applied.append((node, args))
    return applied
