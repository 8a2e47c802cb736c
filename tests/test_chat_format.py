"""The chat layout of cgc_lora_jax/formatting.py against the tokenizer's own apply_chat_template:
ids equal, loss on the answer and the template's end token only; plain stays available."""

import pytest

from cgc_lora_jax.data.formatting import IGNORE, PromptFormat, encode_split
from cgc_lora_jax.run import load_tokenizer
from cgc_lora_jax.data.task_vocab import TaskVocab
from tests.tiny_gguf import Q, write_tiny_gguf

# SmolLM2's template: a default system prompt when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
RECORDS = [{"input": "the tin in the theater", "target": "a tin", "task_dataset": "A", "sample_id": "0"},
           {"input": "in 2024 at the inn", "target": "the 20 ants\nthere", "task_dataset": "B", "sample_id": "1"}]


@pytest.fixture(scope="module", params=["chatml", "smollm2"])
def tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tiny_gguf(folder / "m.gguf", "qwen2", Q.F32)
    tok = load_tokenizer("qwen2", folder)
    if request.param == "smollm2":
        tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def reference_ids(tok, messages, add_generation_prompt):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok.encode(text, add_special_tokens=False)


def test_chat_layout_equals_apply_chat_template_and_masks_the_prompt(tokenizer):
    vocab = TaskVocab(("A", "B"))
    train = encode_split(RECORDS, tokenizer, family="qwen2", vocab=vocab)
    prompts = encode_split(RECORDS, tokenizer, family="qwen2", vocab=vocab, for_prediction=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, row in enumerate(RECORDS):
        user = [{"role": "user", "content": row["input"]}]
        prompt = reference_ids(tokenizer, user, True)
        whole = reference_ids(tokenizer, [*user, {"role": "assistant", "content": row["target"]}], False)
        assert prompts.input_ids[i].tolist() == prompt
        n = len(train.input_ids[i])
        # The template's conversation up to and including <|im_end|>; its trailing "\n" is not trained.
        assert train.input_ids[i].tolist() == whole[:n] and whole[n - 1] == end and len(whole) == n + 1
        labels = train.labels[i].tolist()
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt):] == tokenizer.encode(row["target"], add_special_tokens=False) + [end]


def test_plain_layout_and_required_template(tokenizer):
    plain = PromptFormat.for_tokenizer("qwen2", tokenizer, "plain")
    assert plain.layout == "bos_eos" and plain.prompt_ids([7, 8]) == [tokenizer.bos_token_id, 7, 8]
    chat = PromptFormat.for_tokenizer("qwen2", tokenizer, "chat")
    assert chat.layout == "chat" and chat.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match="data.prompt_format='chatml'"):
        PromptFormat.for_tokenizer("qwen2", tokenizer, "chatml")


def test_a_tokenizer_without_template_stays_plain(tokenizer):
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert PromptFormat.for_tokenizer("qwen2", tokenizer).layout == "bos_eos"  # auto
        with pytest.raises(ValueError, match="has no chat template"):
            PromptFormat.for_tokenizer("qwen2", tokenizer, "chat")
    finally:
        tokenizer.chat_template = saved


def test_prompt_format_reaches_the_config():
    from cgc_lora_jax.config import ConfigError, load_config

    assert load_config("promptcblue").data.prompt_format == "auto"
    assert load_config("promptcblue", ["data.prompt_format=plain"]).data.prompt_format == "plain"
    with pytest.raises(ConfigError):
        load_config("promptcblue", ["data.prompt_fmt=plain"])
