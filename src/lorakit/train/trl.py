"""TRL's `SFTTrainer` on a lorakit model (TRL is optional: `pip install trl`).

    from lorakit.train.trl import LoraSFTTrainer
    trainer = LoraSFTTrainer(model=peft_model, args=SFTConfig(...), train_dataset=..., processing_class=tok)

Why a subclass: SFTTrainer computes the loss with a fused LM head, patched onto the
*transformers* model, whose `base_model` is the decoder. It finds that model inside a PEFT
model by `isinstance(model, peft.PeftModel)`, which ours is not, so it patches our wrapper
and then fails (our `base_model` is the adapter tree, not the decoder). This class moves the
patch to `model.get_base_model()`, as TRL does for PEFT, and saves adapter-only checkpoints
(`AdapterCheckpoints`). Tested against trl 1.16.
"""

from __future__ import annotations

from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from lorakit.model import PeftModel
from lorakit.train.trainer import AdapterCheckpoints

_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks for (its metrics use them)


class LoraSFTTrainer(AdapterCheckpoints, SFTTrainer):
    def __init__(self, model: PeftModel, *args, **kwargs):
        if not isinstance(model, PeftModel):
            raise TypeError("LoraSFTTrainer trains a lorakit PeftModel; wrap the model with lorakit.get_peft_model first.")
        super().__init__(model, *args, **kwargs)
        if "forward" in vars(self.model):  # TRL patched our wrapper: put the fused head where it belongs
            del self.model.forward
            add_fused_lm_head(self.model.get_base_model(), outputs=_FUSED_OUTPUTS)
