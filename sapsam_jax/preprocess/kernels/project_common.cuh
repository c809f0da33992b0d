// Shared by project_bands.cu and rotate_project.cu (sapsam_jax/preprocess/_gpu_kernels.py
// prepends a #define preamble and this file to each). Paper 2.2-2.3.
//
// Preamble:
//   AXIS            0 axial (ray along k), 1 coronal (along j), 2 sagittal (along i)
//   NK, NJ, NI      working-grid shape (k, j, i)
//   HU_T            HU element type (float or short)
//   SAPSAM_NAME(b)  kernel name with the HU dtype suffix, e.g. b##_f32
//   NBANDS, BAND_LO, BAND_HI   HU bands as brace lists; band b is [lo, hi), the last [lo, hi]
//   FILL_HU, MASK_THRESHOLD    outside value and mask re-threshold (GeometryConfig)
//
// One thread owns one ray (one output pixel of the whole-volume image) and walks it once,
// accumulating the band sums and counts of every sub-region it crosses: an axial ray crosses
// the three k-thirds, a sagittal ray the two i-halves, a coronal ray stays in one sub-region.

#define SUB_K (NK / 3)  // sub-region thirds along k (paper 2.3: 72 on the paper grid)
#define SUB_I (NI / 2)  // halves along i: i < NI/2 is the patient's right
#define NSUB 6

#if AXIS == 0
#define RAY_N NK
#define IMG_H NJ
#define IMG_W NI
#define SUB_H NJ
#define SUB_W SUB_I
#elif AXIS == 1
#define RAY_N NJ
#define IMG_H NK
#define IMG_W NI
#define SUB_H SUB_K
#define SUB_W SUB_I
#elif AXIS == 2
#define RAY_N NI
#define IMG_H NK
#define IMG_W NJ
#define SUB_H SUB_K
#define SUB_W NJ
#else
#error "AXIS must be 0, 1 or 2"
#endif

// Voxel (k, j, i) at step t of the ray through image pixel (p, q).
__device__ __forceinline__ void ray_voxel(int p, int q, int t, int& k, int& j, int& i) {
#if AXIS == 0
    k = t; j = p; i = q;
#elif AXIS == 1
    k = p; j = t; i = q;
#else
    k = p; j = q; i = t;
#endif
}

// Sub-region of voxel (k, i) in config.SUBREGIONS order (left_upper .. right_lower), -1 if none.
__device__ __forceinline__ int subregion_of(int k, int i) {
    const int level = k / SUB_K;  // 0 lower, 1 middle, 2 upper (k runs toward Superior)
    const int half = i / SUB_I;   // 0 patient's right, 1 left (i runs toward Left)
    if (level > 2 || half > 1) return -1;
    return (half == 1 ? 0 : 3) + (2 - level);
}

// Pixel of the ray in its sub-region's image; the same for every step of the ray.
__device__ __forceinline__ void subregion_pixel(int p, int q, int& y, int& x) {
#if AXIS == 0
    y = p; x = q % SUB_I;
#elif AXIS == 1
    y = p % SUB_K; x = q % SUB_I;
#else
    y = p % SUB_K; x = q;
#endif
}

struct BandAcc {
    float sum[NBANDS];
    int count[NBANDS];
};

__device__ __forceinline__ void band_reset(BandAcc& a) {
#pragma unroll
    for (int b = 0; b < NBANDS; ++b) { a.sum[b] = 0.f; a.count[b] = 0; }
}

__device__ __forceinline__ void band_add(BandAcc& a, float v) {
    const float lo[NBANDS] = BAND_LO;
    const float hi[NBANDS] = BAND_HI;
#pragma unroll
    for (int b = 0; b < NBANDS; ++b) {
        const bool below_hi = (b == NBANDS - 1) ? (v <= hi[b]) : (v < hi[b]);
        if (v >= lo[b] && below_hi) { a.sum[b] += v; a.count[b] += 1; }
    }
}

__device__ __forceinline__ float rescale01(float mean, float lo, float hi) {
    return fminf(fmaxf((mean - lo) / (hi - lo), 0.f), 1.f);
}

// Mean per band, rescaled to [0, 1] within the band; 0 where the ray met no voxel of the band.
__device__ __forceinline__ void band_store(const BandAcc& a, float* out) {
    const float lo[NBANDS] = BAND_LO;
    const float hi[NBANDS] = BAND_HI;
#pragma unroll
    for (int b = 0; b < NBANDS; ++b) {
        out[b] = a.count[b] > 0 ? rescale01(a.sum[b] / (float)a.count[b], lo[b], hi[b]) : 0.f;
    }
}

// bands: (R, NSUB, SUB_H, SUB_W, NBANDS) float32, C order.
__device__ __forceinline__ float* band_out(float* bands, int r, int s, int y, int x) {
    return bands + ((((long long)r * NSUB + s) * SUB_H + y) * SUB_W + x) * NBANDS;
}

// Walk the ray through pixel (p, q) of volume/rotation r. `sample(k, j, i, v, in_gray, in_band)`
// gives the HU and the two mask tests at output voxel (k, j, i). With WITH_GRAY the whole-scan
// gray image (R, IMG_H, IMG_W) gets the mean HU over in_gray voxels, rescaled by the window.
template <bool WITH_GRAY, class Sampler>
__device__ __forceinline__ void project_ray(const Sampler& sample, int r, int p, int q,
                                            float* gray, float* bands, float gray_lo,
                                            float gray_hi) {
    int k, j, i, y, x;
    subregion_pixel(p, q, y, x);
    ray_voxel(p, q, 0, k, j, i);
    int sub = subregion_of(k, i);
    BandAcc acc;
    band_reset(acc);
    float gray_sum = 0.f;
    int gray_count = 0;
    for (int t = 0; t < RAY_N; ++t) {
        ray_voxel(p, q, t, k, j, i);
        const int s = subregion_of(k, i);
        if (s != sub) {  // the ray enters the next third/half: flush, same t for the whole warp
            if (sub >= 0) band_store(acc, band_out(bands, r, sub, y, x));
            band_reset(acc);
            sub = s;
        }
        float v;
        bool in_gray, in_band;
        sample(k, j, i, v, in_gray, in_band);
        if (WITH_GRAY && in_gray) { gray_sum += v; gray_count += 1; }
        if (in_band && sub >= 0) band_add(acc, v);
    }
    if (sub >= 0) band_store(acc, band_out(bands, r, sub, y, x));
    if (WITH_GRAY) {
        gray[((long long)r * IMG_H + p) * IMG_W + q] =
            gray_count > 0 ? rescale01(gray_sum / (float)gray_count, gray_lo, gray_hi) : 0.f;
    }
}
