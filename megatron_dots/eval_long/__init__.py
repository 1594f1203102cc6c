"""`megatron-dots eval-long`: passkey and multi-key retrieval in long, locally generated
haystacks, scored by greedy exact match and by graded teacher-forced metrics."""
