"""DLRM on torchrec with the scaling knobs of Ardalani et al. (arXiv 2208.08489).

* :mod:`models.dlrm.module`: ``DLRMModule``, the LightningModule (steps, loss, metrics, optimizer
  wiring, checkpoints).
* :mod:`models.dlrm.network`: ``build_dlrm`` (torchrec ``DLRM`` / ``DLRM_DCN``) and ``fold_ids``.
* :mod:`models.dlrm.sizing`: the V/H/M/O knobs, parameter counts and FLOPs (no torchrec import).
* :mod:`models.dlrm.sharded`: DMP with the embedding optimizer fused into backward,
  ``FusedDenseOptimizer`` and plain-tensor checkpoints.
* :mod:`models.dlrm.metrics`: log loss, normalized entropy, AUROC.
* :mod:`models.dlrm.strategy`: ``TorchrecDDPStrategy``, Lightning's DDP without a second wrap
  (``torchrec_ddp``; ``module`` imports it, so a DLRM config always has it registered).

The batches and the feature schema come from :mod:`datamodules.ctr`.
"""
