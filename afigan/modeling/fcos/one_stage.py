"""``OneStageDetector``: a proposal generator used as the detector (AdelaiDet's meta-architecture name).

Detectron2's ``ProposalNetwork`` already runs backbone + proposal generator and rescales the
outputs; this subclass only reports them under ``"instances"``, so evaluators, ``DefaultPredictor``
and ``run_net.py --eval-only`` treat FCOS like any other detector.
"""

from typing import Dict, List

from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.rcnn import ProposalNetwork

__all__ = ["OneStageDetector"]


@META_ARCH_REGISTRY.register()
class OneStageDetector(ProposalNetwork):
    """Backbone + a dense head registered as a proposal generator (``MODEL.PROPOSAL_GENERATOR.NAME``,
    e.g. "FCOS").

    Input: Detectron2's list of dicts ("image" (3, H, W), optional "instances", "height", "width").
    Training: the head's loss dict. Inference: one ``{"instances": Instances}`` per image with
    ``pred_boxes`` (in the requested output resolution), ``scores``, ``pred_classes``.
    """

    def forward(self, batched_inputs: List[Dict]):
        outputs = super().forward(batched_inputs)
        if self.training:
            return outputs
        return [{"instances": out["proposals"]} for out in outputs]
