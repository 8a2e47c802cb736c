"""Request text -> prompt ids, the way the adapters saw prompts in training.

    completion  a text prompt is formatted like a training prompt, in the run's data.prompt_format
                (data.formatting.PromptFormat: the chat template's frame for an instruct base under
                "auto"/"chat"; under "plain" the family's special tokens around the text's ids:
                P + [gMASK, <sop>] for ChatGLM-6B, [gMASK, sop] + P for ChatGLM2/3, [bos] + P for
                Llama / Qwen2), exactly what eval.py generates from; a list of token ids is taken as
                it is (already formatted)
    chat        with a chat template in the tokenizer (`tokenizer.chat_template`, e.g. an HF
                instruct model): the template's text with the generation prompt, its special
                tokens written in the text; without one (the ChatGLM tokenizers, the demo's):
                the messages' contents joined by newlines, then formatted like a completion's
                text (the adapters were trained on bare inputs, so no role tags are invented)

    builder = PromptBuilder("chatglm", tokenizer)
    builder.completion("把数字写成汉字：305\\n答：")        # -> [..., gMASK, sop]
    builder.chat([{"role": "user", "content": "..."}])
"""

from __future__ import annotations

from cgc_lora_jax.data.formatting import PromptFormat
from cgc_lora_jax.evaluation.answers import stop_ids


class PromptBuilder:
    """Formats request prompts for one tokenizer and family; see the module docstring."""

    def __init__(self, family: str, tokenizer, prompt_format: str = "auto"):
        self.tokenizer = tokenizer
        self.format = PromptFormat.for_tokenizer(family, tokenizer, prompt_format)
        self.chat_template = getattr(tokenizer, "chat_template", None) or None
        # eos and pad end an answer, as in eval's decode_answer.
        self.stop_ids = tuple(stop_ids(tokenizer))

    @property
    def chat_mode(self) -> str:
        return "the tokenizer's chat template" if self.chat_template else "plain join of the message contents"

    def completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.format.prompt_ids(self.tokenizer.encode(prompt, add_special_tokens=False))
        return list(prompt)

    def chat(self, messages: list[dict]) -> list[int]:
        """messages: [{"role", "content": str}] (contents already reduced to text)."""
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.completion("\n".join(m["content"] for m in messages))
