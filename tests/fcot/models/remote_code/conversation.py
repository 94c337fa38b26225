"""Conversation templates in OpenGVLab's MPT separator style (stand-in)."""

import dataclasses

SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str
    system_message: str
    roles: tuple
    sep: str
    messages: list = dataclasses.field(default_factory=list)

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self):
        out = self.system_template.format(system_message=self.system_message) + self.sep
        for role, message in self.messages:
            out += role + message + self.sep if message else role
        return out


_TEMPLATES = {
    "Hermes-2": ("<|im_start|>system\n{system_message}", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "internlm2-chat": ("<|im_start|>system\n{system_message}", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "phi3-chat": ("<|system|>\n{system_message}", ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
}


def get_conv_template(name):
    system_template, roles, sep = _TEMPLATES[name]
    return Conversation(name, system_template, SYSTEM, roles, sep)
