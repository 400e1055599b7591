"""GRPO's rollouts: G sampled completions per prompt, scored, with DAPO's dynamic sampling and overlong penalty.

Tensors: N = prompts * G completions, a prompt's G adjacent; P = prompt width (left-padded), R = response width.
Under a launcher each process samples and scores the groups of its share of a step's prompts, then every process
gathers all of them (`gathered`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from align import distributed
from align.data.collate import pack_groups
from align.models.logprobs import packed_token_logprobs
from align.stages.ppo_rollout import sample


@dataclass
class Groups:
    query_response: torch.Tensor  # [N, P+R]
    attention_mask: torch.Tensor  # [N, P+R]
    mask: torch.Tensor  # [N, R] float: 1 up to and including EOS
    prompt_width: int  # P
    prompts: list[int]  # [N / G] the prompt indices
    rewards: dict[str, torch.Tensor]  # label -> [N] each reward's own scores
    total: torch.Tensor  # [N] weighted sum (with the overlong penalty, where on)

    def size(self) -> int:
        return len(self.prompts)

    def group_std(self) -> torch.Tensor:
        return self.total.view(self.size(), -1).std(1)  # [N / G]

    def to(self, device) -> Groups:
        """The token tensors on `device`; the scores stay on the CPU, where the rewards put them."""
        return replace(self, query_response=self.query_response.to(device),
                       attention_mask=self.attention_mask.to(device), mask=self.mask.to(device))

    def select(self, keep: list[int]) -> Groups:
        """The groups at positions `keep` (of this batch's prompts)."""
        G = self.total.shape[0] // self.size()
        rows = torch.tensor([g * G + k for g in keep for k in range(G)], dtype=torch.long)
        return replace(self, query_response=self.query_response[rows], attention_mask=self.attention_mask[rows],
                       mask=self.mask[rows], prompts=[self.prompts[g] for g in keep],
                       rewards={k: v[rows] for k, v in self.rewards.items()}, total=self.total[rows])


def concat(parts: list[Groups], pad_id: int) -> Groups:
    """One batch from several: prompts left-padded to the widest, responses right-padded to the longest."""
    width = max(p.prompt_width for p in parts)
    response = max(p.mask.shape[1] for p in parts)

    def pad(part: Groups, tensor: torch.Tensor, value) -> torch.Tensor:
        left, right = width - part.prompt_width, response - part.mask.shape[1]
        return F.pad(tensor, (left, right), value=value)

    return Groups(torch.cat([pad(p, p.query_response, pad_id) for p in parts]),
                  torch.cat([pad(p, p.attention_mask, 0) for p in parts]),
                  torch.cat([F.pad(p.mask, (0, response - p.mask.shape[1])) for p in parts]), width,
                  [i for p in parts for i in p.prompts],
                  {k: torch.cat([p.rewards[k] for p in parts]) for k in parts[0].rewards},
                  torch.cat([p.total for p in parts]))


def gathered(groups: Groups, pad_id: int) -> Groups:
    """Every process's groups, in every process, in rank order (the shares are contiguous: the step's prompt order);
    in one process, `groups`."""
    if distributed.world_size() == 1:
        return groups
    device = groups.query_response.device
    # pickled: a CUDA tensor would come back on the device of the process that sent it
    return concat(distributed.gather(groups.to("cpu")), pad_id).to(device)


def grouped_logprobs(model, groups: Groups, rows: torch.Tensor, pad_id: int, temperature: float) -> torch.Tensor:
    """[len(rows), R] log-probs of the response tokens of `groups`' rows `rows` (0 after each EOS), the selected
    completions of each prompt packed into one sequence behind one copy of the prompt (`pack_groups`): a group of G
    completions costs P + their lengths in tokens instead of G * (P + R), and each completion's log-probs are those
    of prompt + completion on its own, at the positions the decoding loop gave it."""
    G = groups.query_response.shape[0] // groups.size()
    qr, width = groups.query_response, groups.prompt_width
    members: dict[int, list[int]] = {}  # group -> positions in `rows`
    for position, row in enumerate(rows.tolist()):
        members.setdefault(row // G, []).append(position)
    order = [position for group in members.values() for position in group]  # the packed responses' order
    lengths = groups.mask[rows].sum(1).long()  # [len(rows)] up to and including EOS
    packed = []
    for group in members.values():
        first = rows[group[0]]
        prompt = qr[first, :width][groups.attention_mask[first, :width].bool()].tolist()
        packed.append((prompt, [qr[rows[p], width : width + lengths[p]].tolist() for p in group]))
    batch = {k: v.to(qr.device) for k, v in pack_groups(packed, pad_id).items()}
    token_logps = packed_token_logprobs(model, batch, temperature)  # [sum of lengths], response by response
    order_t = torch.tensor(order, device=qr.device)
    row_of = order_t.repeat_interleave(lengths[order_t])
    column_of = torch.cat([torch.arange(int(lengths[p]), device=qr.device) for p in order])
    return token_logps.new_zeros(len(order), groups.mask.shape[1]).index_put((row_of, column_of), token_logps)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to `max_new_tokens - buffer` tokens, then
    falling linearly to -1 at `max_new_tokens` (where generation cut the completion off)."""
    start = max_new_tokens - buffer
    return ((start - lengths.float()) / buffer).clamp(min=-1.0, max=0.0)


@torch.no_grad()
def sample_groups(model, tokenizer, rewards, examples, prompt_ids: list[list[int]], prompts: list[int],
                  cfg) -> Groups:
    """G completions of the active (policy) adapter for each prompt index in `prompts`, scored."""
    G = cfg.num_generations
    query_response, attention_mask, mask, width = sample(model, tokenizer, [prompt_ids[i] for i in prompts], cfg,
                                                         repeats=G)
    texts = tokenizer.batch_decode(query_response[:, width:], skip_special_tokens=True)
    chosen = [examples[i] for i in prompts for _ in range(G)]
    messages, rules = [ex.prompt for ex in chosen], [ex.rule for ex in chosen]
    scores, total = {}, torch.zeros(len(texts))
    for reward, weight, label in rewards:
        scores[label] = reward.score_sampled(messages, texts, rules, query_response, attention_mask).float().cpu()
        total += weight * scores[label]
    if cfg.overlong_buffer:
        scores["overlong"] = overlong_penalty(mask.sum(1).cpu(), cfg.max_new_tokens, cfg.overlong_buffer)
        total += cfg.overlong_penalty * scores["overlong"]
    return Groups(query_response, attention_mask, mask, width, list(prompts), scores, total)


def dynamic_groups(sample_prompts, first: list[int], extra_prompts, wanted: int, rounds: int,
                   pad_id: int) -> tuple[Groups, dict[str, float]]:
    """DAPO's dynamic sampling: groups whose rewards all tie teach nothing, so prompts drawn by `extra_prompts(round)`
    are sampled too, up to `rounds` more times, until `wanted` groups have rewards that differ; a batch still short
    then is filled with tied groups (it keeps its size). `sample_prompts(indices)` samples and scores."""
    batch = sample_prompts(first)
    tied = torch.isclose(batch.group_std(), torch.zeros(batch.size()))
    informative = [batch.select([g for g in range(batch.size()) if not tied[g]])]
    spare = batch.select([g for g in range(batch.size()) if tied[g]])
    done = 0
    while sum(p.size() for p in informative) < wanted and done < rounds:
        done += 1
        more = sample_prompts(extra_prompts(done))
        differ = ~torch.isclose(more.group_std(), torch.zeros(more.size()))
        informative.append(more.select([g for g in range(more.size()) if differ[g]]))
    parts = [p for p in informative if p.size()]
    have = sum(p.size() for p in parts)
    if have < wanted:
        parts.append(spare.select(list(range(wanted - have))))
    groups = concat(parts, pad_id) if len(parts) > 1 else parts[0]
    stats = {"dynamic_sampling/rounds": float(done), "dynamic_sampling/first_frac_zero_std": float(tied.float().mean())}
    return groups.select(list(range(wanted))), stats
