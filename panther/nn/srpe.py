sinSRPE = None  # issue [B]
