// Marker-flooding watershed on a quantised edge map: one synchronous flooding step.
//
// The host sweeps the edge levels in increasing order and, per level, launches this kernel until
// no voxel changes (sapsam_jax/preprocess/_watershed.py, NumPy twin `flood_numpy`). A voxel
// that is unlabelled, inside the mask and at or below the current level takes the label of its
// neighbour with the smallest flooding key, among neighbours labelled before this step:
//     key = level_at_labelling * KEY_STRIDE + step   (markers: their own level * KEY_STRIDE).
// This orders voxels as scikit-image's priority queue does (by level, then first come first
// served), so the result matches skimage.segmentation.watershed up to plateau ties (see below;
// scikit-image breaks them by push order). Voxels written in this step
// carry key == step_key and are skipped by their neighbours, which makes the in-place update
// race-free and deterministic. Ties between equal keys go to the first neighbour in C order.
//
// Preamble defines: LEVEL_T (level dtype), CONNECTIVITY (1: faces, 2: +edges, 3: +corners),
// FLOOD_KERNEL (the kernel's name, e.g. sapsam_watershed_flood_3d_c1_u8). The kernel has C++
// linkage; CuPy finds its mangled name through RawModule(name_expressions=[FLOOD_KERNEL]).

#define SAPSAM_UNLABELLED_KEY 0x7fffffff

__global__ void FLOOD_KERNEL(
    const LEVEL_T* __restrict__ levels,
    const unsigned char* __restrict__ mask,
    int* labels,
    int* keys,
    const int level,
    const int step_key,
    int* changed,
    const int nz,
    const int ny,
    const int nx)
{
    const long long n = (long long)nz * ny * nx;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
        if (labels[idx] != 0 || !mask[idx] || (int)levels[idx] > level) {
            continue;
        }
        const int x = (int)(idx % nx);
        const int y = (int)((idx / nx) % ny);
        const int z = (int)(idx / ((long long)nx * ny));
        int best_key = step_key;
        int best_label = 0;
        for (int dz = -1; dz <= 1; ++dz) {
            for (int dy = -1; dy <= 1; ++dy) {
                for (int dx = -1; dx <= 1; ++dx) {
                    const int order = (dz != 0) + (dy != 0) + (dx != 0);
                    if (order == 0 || order > CONNECTIVITY) {
                        continue;
                    }
                    const int zz = z + dz, yy = y + dy, xx = x + dx;
                    if (zz < 0 || zz >= nz || yy < 0 || yy >= ny || xx < 0 || xx >= nx) {
                        continue;
                    }
                    const long long nb = ((long long)zz * ny + yy) * nx + xx;
                    const int key = keys[nb];
                    if (key < best_key) {
                        best_key = key;
                        best_label = labels[nb];
                    }
                }
            }
        }
        if (best_label != 0) {
            labels[idx] = best_label;
            keys[idx] = step_key;
            *changed = 1;
        }
    }
}
