SKConv2d = None  # issue [B]
