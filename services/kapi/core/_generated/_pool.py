"""kapi's descriptor pool: generated code registers here, not in the default."""

from google.protobuf.descriptor_pool import DescriptorPool

POOL = DescriptorPool()
