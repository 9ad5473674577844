from pipesplit.runtime.messages import NewRequest, SeqStep, StepMessage, decode, encode
from pipesplit.runtime.sampler import SamplingParams


def test_step_message_round_trip_keeps_types():
    msg = StepMessage(
        step_id=3,
        seqs=(SeqStep(1, 5, (10, 11), True), SeqStep(2, 1, (3,), False)),
        new_requests=(NewRequest(1, SamplingParams(temperature=0.5, stop=("x",), seed=4), 4),),
        preempted=(9,),
        finished=(8,),
    )
    back = decode(encode(msg))
    assert back == msg
    assert isinstance(back.seqs[0].new_slots, tuple) and isinstance(back.new_requests[0].params, SamplingParams)
    assert back.num_tokens == 3 and back.num_samples == 1
