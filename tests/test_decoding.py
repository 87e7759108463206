"""Decoders and decoding strategies: one step interface, exact beam search, attention, losses."""

import itertools

import pytest
import torch

from captioning.decoding import beam_search, greedy_decode, sample_decode
from captioning.losses import doubly_stochastic_penalty, masked_cross_entropy
from captioning.models.decoders import ShowAttendTellDecoder, ShowTellDecoder, UpDownDecoder
from captioning.models.encoders import EncodedImages
from captioning.scheduled_sampling import SamplingSchedule, scheduled_sampling_forward

PAD, BOS, EOS = 0, 1, 2
ENCODER_DIM, PIXELS = 6, 4

DECODERS = [
    ("show_tell", {"cell": "lstm", "condition": "input"}),
    ("show_tell", {"cell": "gru", "condition": "state"}),
    ("show_tell", {"cell": "rnn", "condition": "every_step"}),
    ("show_attend_tell", {"cell": "lstm"}),
    ("show_attend_tell", {"cell": "gru", "context_encoder": "birnn", "tie_embeddings": True}),
    ("show_attend_tell", {"cell": "rnn", "gate": False, "num_layers": 2}),
    ("updown", {"tie_embeddings": False}),
    ("updown", {"tie_embeddings": True, "init_scale": 0.1}),
]
IDS = [f"{kind}-{'-'.join(str(v) for v in options.values())}" for kind, options in DECODERS]


def make_decoder(kind: str, vocab_size: int, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    sizes = {"embed_dim": 8, "hidden_size": 16, "dropout": 0.0}
    if kind == "show_attend_tell":
        return ShowAttendTellDecoder(vocab_size, ENCODER_DIM, attention_dim=8, context_hidden_size=4,
                                     **sizes, **options)
    if kind == "updown":
        return UpDownDecoder(vocab_size, ENCODER_DIM, attention_dim=8, **sizes, **options)
    return ShowTellDecoder(vocab_size, ENCODER_DIM, **sizes, **options)


def make_features(images: int, seed: int = 1) -> EncodedImages:
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(images, PIXELS, ENCODER_DIM, generator=generator)  # (batch, num_pixels, encoder_dim)
    return EncodedImages(grid.mean(dim=1), grid)


def random_captions(lengths: list[int], vocab_size: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> w... <eos>`` rows padded with 0; lengths count <bos> and <eos>."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, 0], tokens[row, length - 1] = BOS, EOS
        tokens[row, 1:length - 1] = torch.randint(3, vocab_size, (length - 2,), generator=generator)
    return tokens, torch.tensor(lengths)


@pytest.mark.parametrize(("kind", "options"), DECODERS, ids=IDS)
def test_stepping_reproduces_the_teacher_forced_pass(kind: str, options: dict) -> None:
    """``step`` and ``forward`` are one model: word by word gives the same logits and attention."""
    decoder = make_decoder(kind, 12, **options).eval()
    features = decoder.prepare(make_features(3))
    tokens, lengths = random_captions([6, 3, 5], 12)
    with torch.no_grad():
        output = decoder(features, tokens, lengths)
        state = decoder.init_state(features)
        for t in range(tokens.shape[1] - 1):
            logits, state, weights = decoder.step(tokens[:, t], state, features)
            for row, length in enumerate(lengths.tolist()):
                if t < length - 1:
                    torch.testing.assert_close(logits[row], output.logits[row, t])
                    if weights is not None:
                        torch.testing.assert_close(weights[row], output.attention[row, t])
                elif output.attention is not None:
                    assert not output.attention[row, t].any()


@pytest.mark.parametrize(("kind", "options"), DECODERS, ids=IDS)
def test_each_decoder_overfits_eight_captions_until_greedy_reproduces_them(kind: str, options: dict) -> None:
    vocab_size = 14
    decoder = make_decoder(kind, vocab_size, **options)
    features = make_features(8)
    tokens, lengths = random_captions([7, 5, 6, 4, 7, 3, 6, 5], vocab_size)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    expected = [tokens[row, 1:length - 1].tolist() for row, length in enumerate(lengths.tolist())]
    for _ in range(60):
        for _ in range(10):
            loss = masked_cross_entropy(decoder(features, tokens, lengths).logits, tokens[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        decoded = greedy_decode(decoder.eval(), features, BOS, EOS, max_length=8)
        decoder.train()
        got = [[t for t in row if t != PAD] for row in decoded.tokens.tolist()]
        if got == expected:
            break
    assert got == expected, f"after {loss.item():.3f} loss"


def test_greedy_decoding_follows_the_argmax_and_stops_at_eos() -> None:
    decoder = make_decoder("show_attend_tell", 12).eval()
    features = decoder.prepare(make_features(4))
    decoded = greedy_decode(decoder, features, BOS, EOS, max_length=7)
    for row in range(4):
        single = features.select(torch.tensor([row]))
        state, token, expected, log_prob = decoder.init_state(single), torch.tensor([BOS]), [], 0.0
        for _ in range(7):
            logits, state, _ = decoder.step(token, state, single)
            log_probs = torch.log_softmax(logits, -1)
            log_probs[:, [PAD, BOS]] = -torch.inf  # special tokens are never generated
            token = log_probs.argmax(-1)
            log_prob += log_probs[0, token].item()
            if token.item() == EOS:
                break
            expected.append(token.item())
        got = decoded.tokens[row].tolist()
        assert got[:len(expected)] == expected and all(t == PAD for t in got[len(expected):])
        assert decoded.log_probs[row].item() == pytest.approx(log_prob, abs=1e-5)


def exhaustive_search(decoder: torch.nn.Module, features: EncodedImages, vocab_size: int, max_length: int,
                      length_penalty: float) -> list[tuple[float, list[int], float]]:
    """Every caption up to ``max_length`` words, scored alone: (ranking score, words, log-prob), best first."""
    words = [w for w in range(vocab_size) if w not in (PAD, BOS)]
    scored = {}
    for length in range(1, max_length + 1):
        for sequence in itertools.product(words, repeat=length):
            if EOS in sequence[:-1] or (length < max_length and sequence[-1] != EOS):
                continue  # an <eos> ends a caption; only captions cut at max_length may lack one
            state, log_prob, token = decoder.init_state(features), 0.0, torch.tensor([BOS])
            for word in sequence:
                logits, state, _ = decoder.step(token, state, features)
                log_prob += torch.log_softmax(logits.float(), -1)[0, word].item()
                token = torch.tensor([word])
            scored[sequence] = log_prob
    ranked = [(log_prob / len(sequence) ** length_penalty, [w for w in sequence if w != EOS], log_prob)
              for sequence, log_prob in scored.items()]
    return sorted(ranked, key=lambda entry: -entry[0])


@pytest.mark.parametrize("length_penalty", [0.0, 0.7, 1.0])
@pytest.mark.parametrize(("kind", "options"), DECODERS, ids=IDS)
def test_batched_beam_search_equals_exhaustive_search(kind: str, options: dict, length_penalty: float) -> None:
    """A beam that keeps every running hypothesis finds the true n best under the same ranking.

    Beam 12 holds all 3 + 9 candidates of the middle step but not the 40 captions, so a search that
    kept finished hypotheses in the beam on their raw log-probability would prune some of the best.
    """
    vocab_size, max_length, n_best = 6, 3, 3  # words: <eos> and 3 others -> 1 + 3 + 9 finished, 27 cut
    decoder = make_decoder(kind, vocab_size, seed=5, **options).eval()
    features = decoder.prepare(make_features(3, seed=6))
    decoded = beam_search(decoder, features, BOS, EOS, max_length, beam_size=12, length_penalty=length_penalty,
                          n_best=n_best)
    for image in range(3):
        reference = exhaustive_search(decoder, features.select(torch.tensor([image])), vocab_size, max_length,
                                      length_penalty)
        for rank in range(n_best):
            row = image * n_best + rank
            _, words, log_prob = reference[rank]
            assert [t for t in decoded.tokens[row].tolist() if t != PAD] == words
            assert decoded.log_probs[row].item() == pytest.approx(log_prob, abs=1e-5)


@pytest.mark.parametrize(("kind", "options"), DECODERS, ids=IDS)
def test_a_narrow_beam_ranks_finished_captions_as_it_searches(kind: str, options: dict) -> None:
    """Beam 3 still finds the exhaustive 3 best at length penalty 1 on these decoders (a seeded case,
    not a guarantee): finished captions wait in their pool instead of holding beams on their raw
    log-probability, which lost the best normalised caption on half of these decoders."""
    vocab_size, max_length, n_best = 6, 3, 3
    decoder = make_decoder(kind, vocab_size, seed=5, **options).eval()
    features = decoder.prepare(make_features(3, seed=6))
    decoded = beam_search(decoder, features, BOS, EOS, max_length, beam_size=3, length_penalty=1.0, n_best=n_best)
    for image in range(3):
        reference = exhaustive_search(decoder, features.select(torch.tensor([image])), vocab_size, max_length, 1.0)
        got = [[t for t in decoded.tokens[image * n_best + rank].tolist() if t != PAD] for rank in range(n_best)]
        assert got == [words for _, words, _ in reference[:n_best]]


def test_beam_search_with_a_narrow_beam_matches_its_own_single_image_runs() -> None:
    """Batching images (and their beams) changes nothing: each image decoded alone gives the same."""
    decoder = make_decoder("show_attend_tell", 15, seed=7, cell="gru").eval()
    features = decoder.prepare(make_features(5, seed=8))
    batched = beam_search(decoder, features, BOS, EOS, max_length=6, beam_size=3, n_best=2, length_penalty=0.7)
    for image in range(5):
        alone = beam_search(decoder, features.select(torch.tensor([image])), BOS, EOS, max_length=6,
                            beam_size=3, n_best=2, length_penalty=0.7)
        width = alone.tokens.shape[1]
        assert torch.equal(batched.tokens[2 * image:2 * image + 2, :width], alone.tokens)
        assert not batched.tokens[2 * image:2 * image + 2, width:].any()
        torch.testing.assert_close(batched.log_probs[2 * image:2 * image + 2], alone.log_probs)
        torch.testing.assert_close(batched.attention[2 * image:2 * image + 2, :width], alone.attention)


@pytest.mark.parametrize("kind", ["show_tell", "show_attend_tell"])
def test_beam_of_one_and_top_k_of_one_equal_greedy(kind: str) -> None:
    decoder = make_decoder(kind, 12, seed=3).eval()
    features = decoder.prepare(make_features(6, seed=4))
    greedy = greedy_decode(decoder, features, BOS, EOS, max_length=9)
    beam = beam_search(decoder, features, BOS, EOS, max_length=9, beam_size=1)
    sampled = sample_decode(decoder, features, BOS, EOS, max_length=9, top_k=1,
                            generator=torch.Generator().manual_seed(0))
    for other in (beam, sampled):
        assert torch.equal(other.tokens, greedy.tokens)
        torch.testing.assert_close(other.log_probs, greedy.log_probs)


def test_unk_is_never_generated_when_its_id_is_given() -> None:
    decoder = make_decoder("show_attend_tell", 8, seed=3).eval()
    features = decoder.prepare(make_features(6, seed=4))
    unk = greedy_decode(decoder, features, BOS, EOS, max_length=6).tokens[:, 0].mode().values.item()
    torch.manual_seed(0)  # sample_decode draws from the global generator
    for decode in (greedy_decode, sample_decode, beam_search):
        assert (decode(decoder, features, BOS, EOS, max_length=6).tokens == unk).any()
        assert not (decode(decoder, features, BOS, EOS, max_length=6, unk_id=unk).tokens == unk).any()


class CyclingDecoder(torch.nn.Module):
    """Wants ``3 4 5 3 4 5 ...`` (any other word, and <bos>, is followed by 3); <eos> is unlikely."""

    following = torch.tensor([3, 3, 3, 4, 5, 3, 3, 3])  # the word it wants after each word

    def prepare(self, features: EncodedImages) -> EncodedImages:
        return features

    def init_state(self, features: EncodedImages) -> tuple[torch.Tensor]:
        return (torch.zeros(1, features.global_features.shape[0], 1),)  # (layers, rows, hidden)

    def step(self, token: torch.Tensor, state: tuple[torch.Tensor], features: EncodedImages
             ) -> tuple[torch.Tensor, tuple[torch.Tensor], None]:
        logits = torch.zeros(token.shape[0], 8)  # (rows, vocab_size)
        logits[:, EOS] = -4.0
        logits.scatter_(1, self.following[token].unsqueeze(1), 5.0)
        return logits, state, None


def _trigrams(words: list[int]) -> list[tuple[int, ...]]:
    return [tuple(words[i:i + 3]) for i in range(len(words) - 2)]


def test_trigram_blocking_stops_a_decoder_that_repeats_itself() -> None:
    features = make_features(2)
    repeating = beam_search(CyclingDecoder(), features, BOS, EOS, max_length=8, beam_size=3, n_best=3)
    assert repeating.tokens[0].tolist() == [3, 4, 5, 3, 4, 5, 3, 4]
    blocked = beam_search(CyclingDecoder(), features, BOS, EOS, max_length=8, beam_size=3, n_best=3,
                          block_trigrams=True)
    best = blocked.tokens[0].tolist()
    wanted = CyclingDecoder.following[torch.tensor([BOS] + best[:-1])].tolist()
    assert sum(w != x for w, x in zip(wanted, best)) == 1  # one detour is enough for 8 words
    for row in blocked.tokens.tolist():
        words = [t for t in row if t != PAD]
        assert len(set(_trigrams(words))) == len(_trigrams(words))
    decoder = make_decoder("show_attend_tell", 6, seed=3).eval()  # 3 real words: repeats are likely
    features = decoder.prepare(make_features(8, seed=4))
    default = beam_search(decoder, features, BOS, EOS, max_length=9, beam_size=3, n_best=2, length_penalty=1.0)
    off = beam_search(decoder, features, BOS, EOS, max_length=9, beam_size=3, n_best=2, length_penalty=1.0,
                      block_trigrams=False)
    assert torch.equal(off.tokens, default.tokens) and torch.equal(off.log_probs, default.log_probs)
    on = beam_search(decoder, features, BOS, EOS, max_length=9, beam_size=3, n_best=2, length_penalty=1.0,
                     block_trigrams=True)
    assert any(len(set(_trigrams(r))) < len(_trigrams(r)) for r in default.tokens.tolist())
    for row in on.tokens.tolist():
        words = [t for t in row if t != PAD]
        assert len(set(_trigrams(words))) == len(_trigrams(words))


def test_min_length_and_sampling_respect_their_limits() -> None:
    decoder = make_decoder("show_tell", 12, seed=3).eval()
    features = make_features(16, seed=4)
    for decode in (greedy_decode, beam_search):
        decoded = decode(decoder, features, BOS, EOS, max_length=8, min_length=4)
        assert ((decoded.tokens != PAD).sum(dim=1) >= 4).all()
    logits, _, _ = decoder.step(torch.full((16,), BOS), decoder.init_state(features), features)
    log_probs = torch.log_softmax(logits, -1)
    log_probs[:, [PAD, BOS]] = -torch.inf
    top3 = log_probs.topk(3, dim=1).indices
    first_words = sample_decode(decoder, features, BOS, EOS, max_length=1, top_k=3, temperature=2.0,
                                generator=torch.Generator().manual_seed(1)).tokens[:, 0]
    first_words = torch.where(first_words == PAD, EOS, first_words)  # <eos> is stored as padding
    assert (top3 == first_words.unsqueeze(1)).any(dim=1).all()


def test_attention_weights_are_a_distribution_per_generated_word() -> None:
    decoder = make_decoder("show_attend_tell", 12, seed=9, context_encoder="birnn").eval()
    features = decoder.prepare(make_features(5, seed=10))
    for decoded in (greedy_decode(decoder, features, BOS, EOS, max_length=6),
                    beam_search(decoder, features, BOS, EOS, max_length=6, beam_size=3)):
        generated = decoded.attention.sum(dim=2) > 0  # (rows, steps): steps up to and including <eos>
        assert (decoded.attention >= 0).all()
        torch.testing.assert_close(decoded.attention.sum(dim=2)[generated],
                                   torch.ones(int(generated.sum())))
        words = (decoded.tokens != PAD).sum(dim=1)
        assert (generated.sum(dim=1) >= words).all()


@pytest.mark.parametrize(("kind", "options"), DECODERS, ids=IDS)
def test_padding_never_changes_the_loss(kind: str, options: dict) -> None:
    decoder = make_decoder(kind, 12, **options).eval()
    features = make_features(3)
    tokens, lengths = random_captions([6, 3, 5], 12)
    output = decoder(features, tokens, lengths)
    loss = masked_cross_entropy(output.logits, tokens[:, 1:])
    padded = torch.cat([tokens, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    garbage = padded.clone()
    beyond = torch.arange(padded.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
    garbage[beyond] = torch.randint(3, 12, (int(beyond.sum()),), generator=torch.Generator().manual_seed(0))
    for variant in (padded, garbage):
        other = decoder(features, variant, lengths)
        targets = variant[:, 1:].masked_fill(beyond[:, 1:], PAD)
        torch.testing.assert_close(masked_cross_entropy(other.logits, targets), loss)
        if output.attention is not None:
            torch.testing.assert_close(doubly_stochastic_penalty(other.attention),
                                       doubly_stochastic_penalty(output.attention))


def test_doubly_stochastic_penalty_is_zero_when_every_pixel_gets_total_attention_one() -> None:
    even = torch.full((2, PIXELS, PIXELS), 1.0 / PIXELS)  # 4 words, each spreading evenly over 4 pixels
    assert doubly_stochastic_penalty(even).item() == 0.0
    fixated = torch.zeros(2, PIXELS, PIXELS)
    fixated[:, :, 0] = 1.0  # every word on pixel 0: sums (4, 0, 0, 0)
    assert doubly_stochastic_penalty(fixated).item() == pytest.approx((9 + 1 + 1 + 1) / 4)


def test_scheduled_sampling_schedule_and_forward() -> None:
    schedule = SamplingSchedule(start_epoch=2, increase_every=3, increase_by=0.1, max_probability=0.25)
    assert [schedule.probability(e) for e in range(12)] == pytest.approx(
        [0, 0, 0, 0, 0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.25])
    ruotianluo = SamplingSchedule(start_epoch=0)  # its defaults with start 0 (tools/train.py)
    assert [ruotianluo.probability(e) for e in (0, 4, 5, 9, 10, 19, 20, 25, 40)] == pytest.approx(
        [0, 0, 0.05, 0.05, 0.1, 0.15, 0.2, 0.25, 0.25])
    decoder = make_decoder("show_attend_tell", 12).eval()
    features = make_features(3)
    tokens, lengths = random_captions([6, 3, 5], 12)
    teacher = decoder(features, tokens, lengths)
    never = scheduled_sampling_forward(decoder, features, tokens, lengths, probability=0.0)
    torch.testing.assert_close(never.logits, teacher.logits)
    torch.testing.assert_close(never.attention, teacher.attention)
    always = scheduled_sampling_forward(decoder, features, tokens, lengths, probability=1.0,
                                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(always.logits[:, 0], teacher.logits[:, 0])  # <bos> is always the truth
    assert not torch.allclose(always.logits[0, 1:], teacher.logits[0, 1:])
