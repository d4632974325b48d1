import sys
import numpy as np
import gguf
src, dst = sys.argv[1:3]
r = gguf.GGUFReader(src)
w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
for k, f in r.fields.items():
    if k.startswith("GGUF.") or k == "general.architecture":
        continue
    v = f.contents()
    if k == "general.file_type":
        v = 0
    vt = f.types[0]
    if vt == gguf.GGUFValueType.ARRAY:
        w.add_key_value(k, v, vt, sub_type=f.types[-1])
    else:
        w.add_key_value(k, v, vt)
types = {}
for t in r.tensors:
    shape = tuple(int(s) for s in reversed(t.shape))
    arr = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    w.add_tensor(t.name, arr)
print(types)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
