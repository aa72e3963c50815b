import torch
from peft import get_peft_model

from align.adapters import PBLoraConfig
from align.rewards import (
    IGNORE_INDEX,
    arm_rewards,
    encode_responses,
    sequence_log_probs,
)

PROMPTS = ["How do I boil an egg?", "Say hi."]
RESPONSES = ["Put it in boiling water for eight minutes, then cool it in cold water.", "Hi!"]


def test_encoding_labels_exactly_the_response_and_its_eos(tiny_lm):
    _, tokenizer = tiny_lm
    batch = encode_responses(tokenizer, PROMPTS, RESPONSES)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == tokenizer(response, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
        assert text.startswith("<|im_start|>user\n" + prompt) and text.endswith(
            response + "<|im_end|>"
        )
    assert batch["attention_mask"][1, -1] == 0  # right padding on the shorter row


def test_sequence_log_probs_equal_a_manual_sum_and_ignore_padding(tiny_lm):
    model, tokenizer = tiny_lm
    batch = encode_responses(tokenizer, PROMPTS, RESPONSES)
    with torch.no_grad():
        rewards = sequence_log_probs(model, **batch)
        for row in range(2):
            length = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row : row + 1, :length]
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            expected = sum(
                log_probs[t - 1, ids[0, t]]
                for t in range(length)
                if batch["labels"][row, t] != IGNORE_INDEX
            )
            torch.testing.assert_close(rewards[row], expected, rtol=1e-5, atol=1e-4)
    alone = arm_rewards(model, tokenizer, PROMPTS[1:], RESPONSES[1:])
    torch.testing.assert_close(alone[0], rewards[1], rtol=1e-5, atol=1e-4)
    assert torch.all(rewards < 0)


def test_a_parm_reward_depends_on_alpha(tiny_lm):
    from align.testing import tiny_causal_lm

    base, tokenizer = tiny_causal_lm(seed=0)
    torch.manual_seed(0)
    parm = get_peft_model(
        base, PBLoraConfig(objectives=["helpful", "harmless"], init_weights=False, lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, p in parm.named_parameters():
            if "pblora_B" in name:
                p.mul_(50)
    helpful = arm_rewards(parm, tokenizer, PROMPTS, RESPONSES, pref=[1.0, 0.0])
    harmless = arm_rewards(parm, tokenizer, PROMPTS, RESPONSES, pref=[0.0, 1.0])
    assert not torch.allclose(helpful, harmless)
