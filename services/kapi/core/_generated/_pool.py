"""kapi's own descriptor pool: generated code registers here, not in the default pool."""

from google.protobuf.descriptor_pool import DescriptorPool

POOL = DescriptorPool()
