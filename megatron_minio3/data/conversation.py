"""SFT conversations: multi-turn chats with images, and their rendering into the rollout's exact token layout.

A `Conversation` is what every SFT reader returns (LLaMA-Factory sharegpt JSON, the Mini-o3 cold-start parquet,
our synthetic oracle trajectories): messages whose `<image>` markers take the conversation's images in order.
`render_conversation` turns it into token ids with a loss mask on the assistant tokens only, laid out exactly
as a rollout lays out the same dialogue (rollout/agent_loop.py):

    chat template(system, first user) + generation prompt          (TurnTokenizer.chat_prompt_ids)
    assistant turn tokens                                           loss 1
    turn_prefix + user text + turn_suffix                           for every later user turn (observation)
    assistant turn tokens [+ <|im_end|> on the last turn]           loss 1

A rollout's assistant turn that called the tool stops at `</grounding>` (the stop string, kept), and the next
turn prefix starts with `<|im_end|>`; the final turn ends with the end-of-turn token the model generated. So
an assistant message is rendered as its text, plus `<|im_end|>` when it is the last message: the same ids the
engine produced for that text in a rollout (tests/unit/test_sft_render.py checks it against the agent loop).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from megatron_minio3.data.images import ImageLoadError, load_image
from megatron_minio3.config.data import IMAGE_MARKER

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ImageSource:
    """An image by file path or by its encoded bytes (parquet datasets embed them)."""

    path: str | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("an ImageSource needs exactly one of path and data")

    def load(self) -> Image.Image:
        """The decoded RGB image; ImageLoadError names the path (or says the bytes are bad)."""
        if self.path is not None:
            return load_image(self.path)
        try:
            with Image.open(io.BytesIO(self.data)) as image:
                image.load()
                return image.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad embedded image
            raise ImageLoadError("<embedded bytes>", f"corrupt or unreadable ({exc})") from None


@dataclass(frozen=True)
class Message:
    role: Role
    content: str  # `<image>` marks where each of this message's images goes


@dataclass(frozen=True)
class Conversation:
    uid: str
    messages: tuple[Message, ...]
    images: tuple[ImageSource, ...]  # in the order of the `<image>` markers over all messages
    data_source: str = "sft"

    def validate(self, where: str) -> None:
        """ValueError naming `where` (file and row) unless the chat has the shape SFT needs: an optional system
        message, then user and assistant turns alternating from a user turn, ending with an assistant turn,
        and exactly one image per marker."""
        roles = [m.role for m in self.messages]
        body = roles[1:] if roles and roles[0] == "system" else roles
        if not body or body[0] != "user" or body[-1] != "assistant":
            raise ValueError(f"{where}: a conversation must start with a user turn and end with an assistant turn, "
                             f"got roles {roles}")
        for index, (a, b) in enumerate(zip(body, body[1:])):
            if a == b or "system" in (a, b):
                raise ValueError(f"{where}: user and assistant turns must alternate, got roles {roles}")
        markers = sum(m.content.count(IMAGE_MARKER) for m in self.messages)
        if markers != len(self.images):
            raise ValueError(f"{where}: {markers} {IMAGE_MARKER} markers but {len(self.images)} images")
        for m in self.messages:
            if m.role == "assistant" and IMAGE_MARKER in m.content:
                raise ValueError(f"{where}: an assistant turn cannot carry an image")


@dataclass
class RenderedConversation:
    """Token ids with one `<|image_pad|>` per image (the trainer expands them, as for trajectories)."""

    uid: str
    token_ids: list[int]
    loss_mask: list[int]
    images: list[Image.Image]  # model-side images, in order
    data_source: str


def render_conversation(turns, conv: Conversation, images: Sequence[Image.Image]) -> tuple[list[int], list[int]]:
    """(compact token ids, loss mask) of `conv` in the rollout's layout; `turns` is the rollout's TurnTokenizer
    and `images` the conversation's images (only their count matters here)."""
    from megatron_minio3.data.templates import VISION_PLACEHOLDER

    messages = list(conv.messages)
    system = messages.pop(0).content if messages[0].role == "system" else None
    first_user = messages.pop(0)
    ids = turns.chat_prompt_ids(system, first_user.content.replace(IMAGE_MARKER, VISION_PLACEHOLDER))
    mask = [0] * len(ids)
    for index, message in enumerate(messages):
        if message.role == "assistant":
            piece = turns.encode_plain(message.content)  # model text: special-token strings stay text
            if index == len(messages) - 1:
                piece = piece + [turns.im_end_id]
            ids += piece
            mask += [1] * len(piece)
        else:
            piece = turns.user_turn_ids(message.content.replace(IMAGE_MARKER, VISION_PLACEHOLDER))
            ids += piece
            mask += [0] * len(piece)
    num_pads = ids.count(turns.image_pad_id)
    if num_pads != len(images):
        raise ValueError(f"{conv.uid}: the rendered chat has {num_pads} image placeholders for {len(images)} images")
    return ids, mask
