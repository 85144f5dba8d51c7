"""Any device (a megatron-core bug): the MoE load-balancing loss is under-weighted by the
tensor × context parallel size when sequence or context parallelism splits the tokens and
`calculate_per_token_loss=True` (which qwen3kd always uses: losses are normalised by the global
token count).

`TopKRouter._apply_aux_loss` computes the loss with P_i averaged over the *global* token count T
of the TP×CP group (each rank holds a partial sum), then `attach_and_log_load_balancing_loss`
scales it by the *local* token count T / (TP·CP) to undo the later division by the global token
count. Summed over the ranks the router gradient of the aux loss is 1 / (TP·CP) of the
single-process one. Nothing errors: an MoE run at TP=2 with SP trains its router differently from
the same run at TP=1. Found by tests/distributed/test_parity.py (router weights differed by 7e-4
after 3 steps while the losses agreed). Fix: scale by the global token count. Remove when
megatron-core passes `total_num_tokens` there.
"""

from megatron.core.transformer.moe import router
from megatron.core.transformer.moe.moe_utils import (
    get_tokens_per_expert_and_token_count,
    switch_load_balancing_loss_func,
)

from megatron_patches._util import Undo, swap

NAME = "moe_aux_loss_sp"
CPU_ONLY = False
SUPPORTED = ">=0.16.1,<0.17"


def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
    aux_loss_coeff = self.get_aux_loss_coeff("aux_loss")
    if aux_loss_coeff == 0:
        return probs
    global_tokens_per_expert, _local, total_num_tokens = get_tokens_per_expert_and_token_count(
        routing_map=routing_map,
        reduce_group=self.tp_cp_group,
        topk=self.topk,
        with_padding_mask=with_padding_mask,
    )
    aux_loss = switch_load_balancing_loss_func(
        probs=scores_for_aux_loss,
        tokens_per_expert=global_tokens_per_expert,
        total_num_tokens=total_num_tokens,
        topk=self.topk,
        num_experts=self.config.num_moe_experts,
        moe_aux_loss_coeff=aux_loss_coeff,
        fused=self.config.moe_router_fusion,
    )
    return self.attach_and_log_load_balancing_loss(
        probs, aux_loss_coeff, aux_loss, "load_balancing_loss", self.tp_cp_group,
        valid_token_count=total_num_tokens,  # the fix: was the local token count
    )


def apply() -> Undo:
    return swap(router.TopKRouter, "_apply_aux_loss", _apply_aux_loss)
