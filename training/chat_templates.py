"""Named chat templates for `data.chat_template` (sft), written from the formats their authors publish:

    lmforge train configs/sft.yaml data.chat_template=chatml          # or llama-3, mistral-instruct

- chatml: OpenAI's ChatML as Hugging Face tokenizers ship it (Qwen, ...):
  `<|im_start|>{role}\\n{content}<|im_end|>\\n`, generation prompt `<|im_start|>assistant\\n`.
- llama-3: Meta-Llama-3-8B-Instruct's template: `<|begin_of_text|>` (the tokenizer's bos_token), then
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content | trim}<|eot_id|>` per message.
- mistral-instruct: Mistral's [INST] format, tokenizer V2/V3 (Mistral-7B-Instruct-v0.3):
  `<s>[INST] user[/INST] answer</s>[INST] ...`; roles alternate user/assistant. A system message
  goes in front of the first user message (mistral-common's V1 rule; the V3 rule, in front of the
  last user message, would change earlier turns as a conversation grows, and the prefix masks
  below need a conversation to render prefix by prefix).

Each wraps what the assistant writes, its answer and the token that ends its turn, in
`{% generation %}` ... `{% endgeneration %}`, so transformers' apply_chat_template(
return_assistant_tokens_mask=True) yields the assistant-only loss mask. The special tokens are
written as text: they are single tokens only where the tokenizer has them (a model trained in that
format); otherwise they are spelled out by the tokenizer's ordinary pieces, which still trains.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA_3 = (
    "{{ bos_token or '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

MISTRAL_INSTRUCT = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token or '<s>' }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('mistral-instruct: roles must alternate user/assistant/user/... (one system message first)') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}{{ '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{% generation %}{{ ' ' + message['content'] + (eos_token or '</s>') }}{% endgeneration %}{% endif %}"
    "{% endfor %}")

TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama-3": LLAMA_3, "mistral-instruct": MISTRAL_INSTRUCT}

# The token each template ends an assistant turn with: generation stops there.
END_OF_TURN: dict[str, str | None] = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "mistral-instruct": None}
