RandMultiHeadAttention = None  # issue [B]
