// Rotation fused with projection (paper 2.3): each ray of each of the R rotated volumes samples
// the unrotated working volume directly, so the 27 rotated volumes never exist in memory.
// NumPy twin: _projection._sample_twin + rotate_project(method="twin").
// Prepended: the #define preamble and project_common.cuh (see there).

struct RotatedSampler {
    const HU_T* hu;
    const unsigned char* masks;  // bit 0: conservative mask (gray), bit 1: refined mask (bands)
    float m[9];                  // output voxel o samples input x = m o + off (m = R^T)
    float off[3];

    // Trilinear HU and masks at x; a mask counts where its trilinear value >= MASK_THRESHOLD.
    // Outside [0, n-1] on any axis is FILL_HU and outside both masks, as scipy's mode="constant".
    __device__ __forceinline__ void operator()(int k, int j, int i, float& v, bool& in_gray,
                                               bool& in_band) const {
        const float fk = (float)k, fj = (float)j, fi = (float)i;
        const float xk = fmaf(m[0], fk, fmaf(m[1], fj, fmaf(m[2], fi, off[0])));
        const float xj = fmaf(m[3], fk, fmaf(m[4], fj, fmaf(m[5], fi, off[1])));
        const float xi = fmaf(m[6], fk, fmaf(m[7], fj, fmaf(m[8], fi, off[2])));
        if (!(xk >= 0.f && xk <= (float)(NK - 1) && xj >= 0.f && xj <= (float)(NJ - 1) &&
              xi >= 0.f && xi <= (float)(NI - 1))) {
            v = FILL_HU;
            in_gray = in_band = false;
            return;
        }
        const int k0 = min((int)xk, NK - 2), j0 = min((int)xj, NJ - 2), i0 = min((int)xi, NI - 2);
        const float wk = xk - (float)k0, wj = xj - (float)j0, wi = xi - (float)i0;
        float h = 0.f, mc = 0.f, mr = 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int dk = c >> 2, dj = (c >> 1) & 1, di = c & 1;
            const float w = (dk ? wk : 1.f - wk) * (dj ? wj : 1.f - wj) * (di ? wi : 1.f - wi);
            const int idx = ((k0 + dk) * NJ + (j0 + dj)) * NI + (i0 + di);
            const unsigned char bits = masks[idx];
            h = fmaf(w, (float)hu[idx], h);
            mc = fmaf(w, (float)(bits & 1), mc);
            mr = fmaf(w, (float)((bits >> 1) & 1), mr);
        }
        v = h;
        in_gray = mc >= MASK_THRESHOLD;
        in_band = mr >= MASK_THRESHOLD;
    }
};

// hu, masks: (NK, NJ, NI); affines: (R, 12) float32 = 3x3 m row-major, then off.
// gray: (R, IMG_H, IMG_W); bands: (R, 6, SUB_H, SUB_W, NBANDS) zero-filled by the caller.
// Grid: x over IMG_H * IMG_W rays, y over the R rotations.
extern "C" __global__ void SAPSAM_NAME(sapsam_rotate_project_bands_3d)(
    const HU_T* __restrict__ hu, const unsigned char* __restrict__ masks,
    const float* __restrict__ affines, float* __restrict__ gray, float* __restrict__ bands,
    float gray_lo, float gray_hi) {
    const int pixel = blockIdx.x * blockDim.x + threadIdx.x;
    if (pixel >= IMG_H * IMG_W) return;
    const int r = blockIdx.y;
    RotatedSampler sample;
    sample.hu = hu;
    sample.masks = masks;
#pragma unroll
    for (int e = 0; e < 9; ++e) sample.m[e] = affines[r * 12 + e];
#pragma unroll
    for (int e = 0; e < 3; ++e) sample.off[e] = affines[r * 12 + 9 + e];
    project_ray<true>(sample, r, pixel / IMG_W, pixel % IMG_W, gray, bands, gray_lo, gray_hi);
}
