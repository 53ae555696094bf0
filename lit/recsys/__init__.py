"""Recommendation-model plumbing shared by the DLRM model and the CTR datamodules.

* :mod:`lit.recsys.batching`: the batch format (torchrec ``Batch`` plus sample indices) and the
  feature schema a datamodule hands to the model.
* :mod:`lit.recsys.sharding`: which global batches each DataLoader worker and DDP rank reads,
  so every sample is read exactly once (single-epoch training).
* :mod:`lit.recsys.fused`: torchrec ``DistributedModelParallel`` with the embedding optimizer
  fused into the backward pass, the dense optimizer beside it, and plain-tensor checkpoints.
* :mod:`lit.recsys.metrics`: log loss, normalized entropy, AUROC and calibration.
* :mod:`lit.recsys.sizing`: parameter counts and FLOPs of a DLRM from its knobs (V, H, M, O).
* :mod:`lit.recsys.single_epoch`: evaluation on a held-out set at fixed sample counts.
* :mod:`lit.recsys.strategy`: a Lightning DDP strategy that leaves the DMP-wrapped model alone.

Everything that imports torchrec does so inside functions, so importing this package is cheap.
"""
